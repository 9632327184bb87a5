r"""Experiments (a) to (f) of spec ntk_analysis.md 4: recipes that train runs, read their kernels
and return tidy tables, each with the paper's prediction beside the measurement.

    python -m ntk_analysis.theory --config=configs/tiny.py:data=digits --root=DIR \
        [--seeds=0,1,2] [--experiments=a,b,c,d,e,f]

Every run is an ordinary `ntkcl_jax.train` run with `train.record_ntk` on (fused-view joint kernels
at each task boundary, WORKDIR/ntk/task<t>/), named after its overrides, so reruns reuse finished
runs and resume unfinished ones; runs shared by experiments are trained once. The same command at
paper scale takes a paper config (e.g. configs/cifar100_in21k.py) on a GPU. Writes DIR/theory.json
and DIR/theory_<x>.png.

(a) overlap_vs_forgetting   rho_{s,t} and principal cosines at theta_t^0 vs the accuracy task s
                            loses while task t trains
(b) orthogonality           dis_temp x NCE sign: inter-task alignment and forgetting
(c) sample_size_and_views   channel / patch / both branches x images per class: final
                            generalization gap, its log-log slope, effective-rank ratio of views
(d) lazy_regime             kernel distance to the task-start kernel and linearisation error,
                            checkpoint by checkpoint
(e) spectra                 per-task spectra at theta_t and theta_T, old-task kernel drift
(f) regularisation_ema      reg_temp x EMA sets on/off: forgetting, plasticity, old-kernel drift
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ntk_analysis import checks, joint, metrics

PREDICTIONS = {
    "a": "forgetting of task s while task t trains grows with their inter-task kernel overlap "
         "(positive rank correlation; Doan et al., NTK-CL's interplay term)",
    "b": "a stronger orthogonality term (dis_temp) lowers inter-task alignment and forgetting; "
         "with the official signed-sum term at weight 1e-4 expect about no effect (spec 4b)",
    "c": "gaps fall like N^-1/2 (log-log slope about -0.5); both branches (3 views) have a gap no "
         "larger than one branch; 'N -> 3N' needs an effective-rank ratio near 3",
    "d": "if the NTK picture applies, the kernel distance S to the task-start kernel and the "
         "linearisation error stay << 1 after the first few percent of a task",
    "e": "fast spectral decay (few dominant directions); old-task kernels drift little (EMA "
         "maintains the intra-task NTK)",
    "f": "final accuracy is U-shaped in the regularisation weight; EMA sets reduce old-kernel "
         "drift",
}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
def run_name(overrides: Mapping[str, object], seed: int) -> str:
  """Directory name of a run: its overrides in sorted order, then the seed."""
  parts = [f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())]
  return ("_".join(parts) or "base") + f"_seed{seed}"


def train_run(config, root: str, overrides: Mapping[str, object], seed: int,
              extra_train: Optional[Mapping[str, object]] = None, log=print) -> str:
  """Trains (or resumes, or reuses) one run with dotted-key overrides; returns its workdir."""
  from ntkcl_jax import train  # pylint: disable=g-import-not-at-top

  def node_of(c, key):
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {key!r}: no such config key")
    return node, leaf

  # overrides equal to the config's value name the same run as no override (trained once)
  overrides = {k: v for k, v in overrides.items() if getattr(*node_of(config, k)) != v}
  wd = os.path.join(root, run_name(overrides, seed))
  if os.path.exists(os.path.join(wd, "results.json")):
    return wd
  c = config.copy_and_resolve_references()
  flat = {"seed": seed, "train.record_ntk": True, **dict(overrides), **dict(extra_train or {})}
  for key, value in flat.items():
    node, leaf = node_of(c, key)
    node[leaf] = value
  log(f"training {wd}")
  train.run(c, wd, progress=False)
  return wd


def max_checkpoints(config) -> int:
  """Checkpoints of a run saved at every step: steps plus task ends (bounds keep_checkpoints,
  which the launcher's free-disk check multiplies by the checkpoint size)."""
  d, o = config.data, config.optim
  tasks = 1 + -(-(d.num_classes - d.init_cls) // d.increment)
  per_task = (d.max_per_class_train or 1000) * max(d.init_cls, d.increment)
  return tasks * o.epochs * -(-per_task // o.batch_size) + tasks + 2


def results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def task_kernel(workdir: str, t: int) -> joint.JointKernel:
  """The fused-view joint kernel recorded at the end of task t (theta_t = theta_{t+1}^0)."""
  path = os.path.join(workdir, "ntk", f"task{t}", "kernel_fused.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} missing: the run was trained without train.record_ntk")
  return joint.JointKernel.load(path)


def _rho(jk, s, t) -> float:
  return metrics.alignment(jk.block(s, s), jk.block(t, t), jk.block(s, t))


def mean_inter_alignment(jk) -> float:
  ts = jk.tasks
  return float(np.mean([_rho(jk, s, u) for i, s in enumerate(ts) for u in ts[i + 1:]]))


def old_kernel_drift(workdir: str, num_tasks: int) -> float:
  """Mean over old tasks s of S(K_ss(theta_s), K_ss(theta_T)) (spec 4e)."""
  last = task_kernel(workdir, num_tasks - 1)
  return float(np.mean([metrics.kernel_distance(task_kernel(workdir, s).block(s, s),
                                                last.block(s, s))
                        for s in range(num_tasks - 1)]))


def _summary_row(workdir: str) -> dict:
  r = results(workdir)
  acc = np.array(r["accuracy_matrix"], np.float64)
  return {"avg_acc": r["avg_incremental_accuracy"], "last_acc": r["last_accuracy"],
          "forgetting": r["forgetting"], "plasticity": float(np.mean(np.diag(acc)))}


def _spearman(x, y) -> float:
  return checks._spearman(x, y)  # pylint: disable=protected-access


def _slope(x, y) -> float:
  x, y = np.asarray(x, float), np.asarray(y, float)
  ok = (x > 0) & (y > 0)
  if ok.sum() < 2 or len(set(x[ok])) < 2:
    return float("nan")
  return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def _plot(path: str, draw: Callable) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  draw(axes)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _sweep_plot(path: str, g: pd.DataFrame, group: str, x: str, curves, ylabels) -> str:
  """Two panels over a log-scaled sweep variable x (0 drawn at 1e-5), one line per group value
  and curve (axis, column, style, label format)."""
  def draw(axes):
    for value, d in g.groupby(group):
      for ax, col, style, label in curves:
        axes[ax].plot(np.maximum(d[x], 1e-5), d[col], style, label=label.format(value))
    for ax, yl in zip(axes, ylabels):
      ax.set_xscale("log")
      ax.set_xlabel(f"{x} (0 plotted at 1e-5)")
      ax.set_ylabel(yl)
      ax.legend(fontsize=7)
  return _plot(path, draw)


def _result(key: str, table: pd.DataFrame, measured: str, holds, plot: Optional[str]) -> dict:
  return {"experiment": key, "prediction": PREDICTIONS[key], "measured": measured,
          "holds": holds, "table": table.to_dict("records"),
          "plot": os.path.basename(plot) if plot else None}


# ----------------------------------------------------------------------------------------------
# (a) overlap vs forgetting
# ----------------------------------------------------------------------------------------------
def overlap_vs_forgetting(workdirs: Sequence[str], plot_path: Optional[str] = None,
                          top_k: int = 3) -> dict:
  """(a): per run and pair s < t, rho_st and top-k principal cosines of the kernel at theta_t^0
  (recorded at the end of task t-1) against the drop A[t-1, s] - A[t, s]."""
  rows = []
  for wd in workdirs:
    acc = np.array(results(wd)["accuracy_matrix"], np.float64)
    for t in range(1, acc.shape[0]):
      jk = task_kernel(wd, t - 1)
      for s in range(t):
        ang = metrics.principal_angles_blocks(jk.block(s, s), jk.block(t, t), jk.block(s, t))
        rows.append({"run": os.path.basename(wd), "s": s, "t": t, "rho": _rho(jk, s, t),
                     "principal_cos_topk": float(ang[:top_k].mean()) if ang.size else 0.0,
                     "accuracy_drop": float(acc[t - 1, s] - acc[t, s])})
  df = pd.DataFrame(rows)
  c_rho = _spearman(df["rho"], df["accuracy_drop"])
  c_cos = _spearman(df["principal_cos_topk"], df["accuracy_drop"])
  if plot_path:
    def draw(axes):
      for ax, col, c in zip(axes, ("rho", "principal_cos_topk"), (c_rho, c_cos)):
        ax.scatter(df[col], df["accuracy_drop"], s=14)
        ax.set_xlabel(col + " at theta_t^0")
        ax.set_ylabel("accuracy drop of task s (points)")
        ax.set_title(f"(a) Spearman {c:.2f}")
    _plot(plot_path, draw)
  return _result("a", df, f"Spearman(rho, drop) = {c_rho:.2f}, Spearman(principal cos, drop) = "
                 f"{c_cos:.2f} over {len(df)} task pairs",
                 bool(c_rho > 0) if np.isfinite(c_rho) else None, plot_path)


# ----------------------------------------------------------------------------------------------
# (b) orthogonality term
# ----------------------------------------------------------------------------------------------
ORTH_GRID = [{"method.dis_temp": d, **sign} for sign in
             ({}, {"method.variant": "corrected", "method.fix_nce_sign": True})
             for d in (0.0, 1e-4, 1e-3)]


def orthogonality(runs: Mapping[str, Mapping[str, object]], plot_path: Optional[str] = None
                  ) -> dict:
  """(b): {workdir: overrides} -> mean inter-task alignment at theta_T and forgetting per run."""
  rows = []
  for wd, ov in runs.items():
    r = results(wd)
    jk = task_kernel(wd, len(r["accuracy_matrix"]) - 1)
    rows.append({"dis_temp": float(ov.get("method.dis_temp", 1e-4)),
                 "nce_sign": "flipped" if ov.get("method.fix_nce_sign") else "official",
                 "seed": r["config"]["seed"], "mean_rho": mean_inter_alignment(jk),
                 **_summary_row(wd)})
  df = pd.DataFrame(rows)
  g = df.groupby(["nce_sign", "dis_temp"], as_index=False)[["mean_rho", "forgetting"]].mean()
  effect = {sign: (float(d["mean_rho"].iloc[-1] - d["mean_rho"].iloc[0]),
                   float(d["forgetting"].iloc[-1] - d["forgetting"].iloc[0]))
            for sign, d in g.groupby("nce_sign")}
  if plot_path:
    _sweep_plot(plot_path, g, "nce_sign", "dis_temp",
                [(0, "mean_rho", "o-", "NCE sign {}"), (1, "forgetting", "o-", "NCE sign {}")],
                ("mean inter-task rho at theta_T", "forgetting (points)"))
  measured = "; ".join(f"NCE sign {s}: dis_temp 0 -> {g['dis_temp'].max():g} changes mean rho "
                       f"by {dr:+.2g} and forgetting by {df_:+.2f} points"
                       for s, (dr, df_) in effect.items())
  holds = bool(all(dr < 0 for dr, _ in effect.values())) if effect else None
  return _result("b", df, measured, holds, plot_path)


# ----------------------------------------------------------------------------------------------
# (c) sample size and views
# ----------------------------------------------------------------------------------------------
def split_accuracies(workdir: str) -> pd.DataFrame:
  """Per task: accuracy at theta_T on its training images (test transform) and on its test
  images, each over all seen classes (the learner's own evaluation, spec method.md 4.2)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ntk_analysis import runs  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import data  # pylint: disable=g-import-not-at-top
  config, learner, state, _ = runs.load_run(workdir)
  stream = data.build_stream(config)
  hi = jnp.int32(stream.tasks[-1][-1] + 1)
  rows = []
  for t, classes in enumerate(stream.tasks):
    row = {"task": t}
    for split, name in (("proto", "train_acc"), ("test", "test_acc")):
      hit = total = 0
      for batch in stream.eval_batches(split, classes, config.optim.eval_batch_size):
        out = learner._eval(state, learner.backbone, learner._global(batch), hi)  # pylint: disable=protected-access
        m = np.asarray(out["mask"])
        hit += int((np.asarray(out["pred"])[m] == np.asarray(out["label"])[m]).sum())
        total += int(m.sum())
      row[name] = 100.0 * hit / max(total, 1)
    rows.append(row)
  df = pd.DataFrame(rows)
  df["gap"] = df["train_acc"] - df["test_acc"]
  return df


def views_rank_ratio(workdir: str, n_per_task: int = 8, num_probes: int = 4) -> dict:
  """r_eff of the stacked three-view kernel over that of the fused view alone (mean over
  tasks): the 'N -> 3N' reading of the tripled features needs about 3."""
  from ntk_analysis import run as ntk_run  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "ntk", "views")
  ntk_run.analyse(workdir, n_per_task=n_per_task, num_probes=num_probes,
                  views=("fused", "channel", "all"), out_dir=out, log=lambda *_: None)
  ranks = {}
  for view in ("fused", "channel", "all"):
    jk = joint.JointKernel.load(os.path.join(out, f"kernel_{view}.npz"))
    ranks[view] = float(np.mean([metrics.effective_rank(jk.block(t, t)) for t in jk.tasks]))
  return {"r_eff": ranks, "ratio_all_over_fused": ranks["all"] / ranks["fused"]}


def sample_size_and_views(runs: Mapping[str, Mapping[str, object]], ratio: Optional[dict] = None,
                          plot_path: Optional[str] = None) -> dict:
  """(c): {workdir: overrides} over method.name x data.max_per_class_train -> mean final gap
  (train minus test accuracy at theta_T) and its log-log slope against N per method."""
  rows = []
  for wd, ov in runs.items():
    gaps = split_accuracies(wd)
    r = results(wd)
    rows.append({"method": r["config"]["method"]["name"], "seed": r["config"]["seed"],
                 "n_per_class": int(r["config"]["data"]["max_per_class_train"]),
                 "gap": float(gaps["gap"].mean()), "train_acc": float(gaps["train_acc"].mean()),
                 "test_acc": float(gaps["test_acc"].mean()), **_summary_row(wd)})
  df = pd.DataFrame(rows)
  g = df.groupby(["method", "n_per_class"], as_index=False)[["gap", "test_acc"]].mean()
  slopes = {m: _slope(d["n_per_class"], d["gap"]) for m, d in g.groupby("method")}
  n_max = g["n_per_class"].max()
  at_max = g[g["n_per_class"] == n_max].set_index("method")["gap"].to_dict()
  parts = ["log-log slope of gap vs N: " + ", ".join(f"{m} {s:.2f}" for m, s in slopes.items()),
           f"gap at N={n_max}: " + ", ".join(f"{m} {v:.1f}" for m, v in at_max.items())]
  holds = None
  if "ntkcl" in at_max and len(at_max) > 1:
    holds = bool(at_max["ntkcl"] <= min(v for m, v in at_max.items() if m != "ntkcl"))
  if ratio:
    parts.append(f"r_eff(3 views) / r_eff(fused) = {ratio['ratio_all_over_fused']:.2f}")
  if plot_path:
    def draw(axes):
      for m, d in g.groupby("method"):
        axes[0].plot(d["n_per_class"], np.maximum(d["gap"], 1e-2), "o-",
                     label=f"{m} (slope {slopes[m]:.2f})")
      axes[0].set_xscale("log")
      axes[0].set_yscale("log")
      axes[0].set_xlabel("training images per class N")
      axes[0].set_ylabel("train - test accuracy at theta_T")
      axes[0].legend(fontsize=7)
      if ratio:
        axes[1].bar(list(ratio["r_eff"]), list(ratio["r_eff"].values()))
        axes[1].set_ylabel("mean intra-task effective rank")
        axes[1].set_title(f"ratio all/fused {ratio['ratio_all_over_fused']:.2f} (claim: ~3)")
    _plot(plot_path, draw)
  res = _result("c", df, "; ".join(parts), holds, plot_path)
  res["slopes"], res["views"] = slopes, ratio
  return res


# ----------------------------------------------------------------------------------------------
# (d) lazy regime
# ----------------------------------------------------------------------------------------------
def lazy_regime(workdir: str, n_per_task: int = 8, num_probes: int = 4, seed: int = 0,
                plot_path: Optional[str] = None) -> dict:
  """(d): for every saved checkpoint (train with train.checkpoint_every_steps=1 and
  keep_checkpoints large), the fused-view joint kernel on fixed subsets of all tasks; S to the
  kernel at the task's start checkpoint, and e_lin from the previous checkpoint of the task."""
  from ntk_analysis import runs  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import data  # pylint: disable=g-import-not-at-top
  from ntkcl_jax.checkpoints import run_state  # pylint: disable=g-import-not-at-top
  ck = run_state.RunCheckpointer(os.path.join(workdir, "checkpoints"), keep=100000,
                                 async_save=False)
  ids = ck.all_ids()
  ck.close()
  config, learner, _, _ = runs.load_run(workdir, ids[0])
  images, _ = runs.task_data(data.build_stream(config))
  probe = runs.probes(learner.spec.feature_dim, num_probes, seed)
  x_all = np.concatenate([images[t][joint.subset_indices(seed, t, len(images[t]), n_per_task)]
                          for t in sorted(images)])
  rows, ref, prev = [], {}, None
  for cid in map(int, ids):
    state, meta = runs.restore_state(workdir, learner, cid)
    task = len(meta["task_records"])  # tasks finished; this checkpoint is within task `task`
    if task >= len(images):
      break  # the checkpoint after the last task
    f, params = runs.readout(learner, state, "fused", probe)
    jk = joint.compute(f, params, images, n=n_per_task, seed=seed, method="jacobian",
                       trace=True, chunk=max(n_per_task, 8))
    if task not in ref:
      ref[task] = jk.k  # theta_task^0: the first checkpoint of this task (end of the previous)
    e_lin = float("nan")
    if prev is not None and prev[0] == task:
      e_lin = metrics.linearisation_error(prev[1], prev[2], params, x_all)
    rows.append({"checkpoint": cid, "step": int(meta["counters"]["global_step"]), "task": task,
                 "S_to_task_start": metrics.kernel_distance(ref[task], jk.k),
                 "relative_change": metrics.relative_change(ref[task], jk.k), "e_lin": e_lin})
    prev = (task, f, params)
  df = pd.DataFrame(rows)
  within = df[df["step"] > df.groupby("task")["step"].transform("min")]
  s_end = df.groupby("task")["S_to_task_start"].last()
  e_med = float(np.nanmedian(within["e_lin"])) if len(within) else float("nan")
  if plot_path:
    def draw(axes):
      axes[0].plot(df["step"], df["S_to_task_start"], ".-")
      axes[1].plot(df["step"], df["e_lin"], ".-")
      for ax, yl in zip(axes, ("S(K(theta_t^0), K(theta))", "e_lin vs previous checkpoint")):
        for t, d in df.groupby("task"):
          ax.axvline(d["step"].min(), color="grey", lw=0.5)
        ax.set_xlabel("global step (grey: task starts)")
        ax.set_ylabel(yl)
    _plot(plot_path, draw)
  measured = ("S at task end per task: " + ", ".join(f"{v:.2g}" for v in s_end) +
              f"; median e_lin between checkpoints {e_med:.2g}")
  holds = bool(s_end.max() < 0.1 and e_med < 0.1) if np.isfinite(e_med) else None
  return _result("d", df, measured, holds, plot_path)


# ----------------------------------------------------------------------------------------------
# (e) spectra and drift
# ----------------------------------------------------------------------------------------------
def spectra_and_drift(workdir: str, plot_path: Optional[str] = None) -> dict:
  """(e): per task t, the spectrum of K_tt at theta_t and theta_T (top-3 eigenvalue share,
  effective rank, kernel-target alignment) and the drift S(K_tt(theta_t), K_tt(theta_T))."""
  num_tasks = len(results(workdir)["accuracy_matrix"])
  last = task_kernel(workdir, num_tasks - 1)
  rows, spectra = [], {}
  for t in range(num_tasks):
    own = task_kernel(workdir, t)
    for when, jk in (("theta_t", own), ("theta_T", last)):
      w = metrics.spectrum(jk.block(t, t))
      w = w / w.sum()
      spectra[(t, when)] = w
      rows.append({"task": t, "at": when, "top3_share": float(w[:3].sum()),
                   "effective_rank": metrics.effective_rank(jk.block(t, t)),
                   "n": int(len(w)),
                   "drift_S": metrics.kernel_distance(own.block(t, t), last.block(t, t))})
  df = pd.DataFrame(rows)
  top3 = float(df["top3_share"].mean())
  drift = float(df[(df["at"] == "theta_T") & (df["task"] < num_tasks - 1)]["drift_S"].mean())
  if plot_path:
    def draw(axes):
      for (t, when), w in spectra.items():
        if when == "theta_t":
          axes[0].semilogy(np.maximum(w, 1e-12), label=f"task {t}")
      axes[0].set_xlabel("eigenvalue index")
      axes[0].set_ylabel("trace-normalised eigenvalue at theta_t")
      axes[0].legend(fontsize=7)
      d = df[(df["at"] == "theta_T") & (df["task"] < num_tasks - 1)]
      axes[1].bar(d["task"], d["drift_S"])
      axes[1].set_xlabel("old task t")
      axes[1].set_ylabel("S(K_tt(theta_t), K_tt(theta_T))")
    _plot(plot_path, draw)
  n = int(df["n"].iloc[0])
  return _result("e", df, f"top-3 eigenvalues hold {100 * top3:.0f}% of the trace of a {n}x{n} "
                 f"task kernel; mean old-task drift S = {drift:.2g}",
                 bool(top3 > 0.5 and drift < 0.1), plot_path)


# ----------------------------------------------------------------------------------------------
# (f) regularisation and EMA
# ----------------------------------------------------------------------------------------------
REG_TEMPS = (0.0, 1e-4, 1e-3, 1e-2)


def regularisation_ema(runs: Mapping[str, Mapping[str, object]],
                       plot_path: Optional[str] = None) -> dict:
  """(f): {workdir: overrides} over reg_temp x frozen_sets -> accuracy, forgetting, plasticity
  and old-task kernel drift."""
  rows = []
  for wd, ov in runs.items():
    r = results(wd)
    rows.append({"reg_temp": float(ov.get("method.reg_temp", 1e-3)),
                 "ema_sets": int(ov.get("method.frozen_sets", 1)), "seed": r["config"]["seed"],
                 "old_kernel_drift": old_kernel_drift(wd, len(r["accuracy_matrix"])),
                 **_summary_row(wd)})
  df = pd.DataFrame(rows)
  g = df.groupby(["ema_sets", "reg_temp"], as_index=False)[
      ["last_acc", "forgetting", "old_kernel_drift"]].mean()
  u_shape = {}
  for e, d in g.groupby("ema_sets"):
    i = int(np.argmax(d["last_acc"].to_numpy()))
    u_shape[e] = 0 < i < len(d) - 1
  drift = g.groupby("ema_sets")["old_kernel_drift"].mean().to_dict()
  if plot_path:
    _sweep_plot(plot_path, g, "ema_sets", "reg_temp",
                [(0, "last_acc", "o-", "EMA sets {}: last acc"),
                 (0, "forgetting", "s--", "EMA sets {}: forgetting"),
                 (1, "old_kernel_drift", "o-", "EMA sets {}")],
                ("percent", "mean old-task kernel drift S"))
  measured = ("best final accuracy at an interior reg_temp: " +
              ", ".join(f"EMA sets {e}: {'yes' if u else 'no'}" for e, u in u_shape.items()) +
              "; mean old-kernel drift: " +
              ", ".join(f"EMA sets {e}: {v:.2g}" for e, v in drift.items()))
  holds = None
  if 0 in drift and 1 in drift:
    holds = bool(drift[1] < drift[0] and any(u_shape.values()))
  return _result("f", df, measured, holds, plot_path)


# ----------------------------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------------------------
def run_all(config, root: str, seeds: Sequence[int] = (0,), experiments: str = "abcdef",
            n_per_class: Sequence[int] = (), reg_temps: Sequence[float] = REG_TEMPS,
            log=print) -> dict:
  """Trains what the chosen experiments need and returns {key: result}; ROOT/theory.json is
  rewritten after each experiment, so an interrupted sweep keeps what it finished."""
  os.makedirs(root, exist_ok=True)
  out: dict = {}
  quick = {"train.checkpoint_every_steps": 0}  # sweep runs checkpoint at task ends only
  png = lambda k: os.path.join(root, f"theory_{k}.png")  # noqa: E731

  def save():
    from ntk_analysis import run as ntk_run  # pylint: disable=g-import-not-at-top
    with open(os.path.join(root, "theory.json"), "w") as f:
      json.dump(ntk_run._clean({k: out[k] for k in sorted(out)}), f, indent=1)  # pylint: disable=protected-access

  def grid_runs(grid, extra=lambda ov: quick):
    return {train_run(config, root, ov, s, extra(ov), log=log): ov for ov in grid for s in seeds}

  base_runs = [train_run(config, root, {}, s, quick, log=log) for s in seeds]
  if "a" in experiments:
    out["a"] = overlap_vs_forgetting(base_runs, png("a"))
  if "e" in experiments:
    out["e"] = spectra_and_drift(base_runs[0], png("e"))
  save()
  if "b" in experiments:
    out["b"] = orthogonality(grid_runs(ORTH_GRID), png("b"))
    save()
  if "d" in experiments:
    wd = train_run(config, root, {"train.checkpoint_every_steps": 1}, seeds[0],
                   extra_train={"train.keep_checkpoints": max_checkpoints(config)}, log=log)
    out["d"] = lazy_regime(wd, plot_path=png("d"))
    save()
  if "f" in experiments:
    grid = [{"method.reg_temp": float(r), "method.frozen_sets": f}
            for f in (1, 0) for r in reg_temps]
    out["f"] = regularisation_ema(grid_runs(grid), png("f"))
    save()
  if "c" in experiments:
    full = int(config.data.max_per_class_train)
    ns = list(n_per_class) or [max(1, full // 4), max(1, full // 2), full]
    grid = [{"method.name": m, "data.max_per_class_train": n}
            for m in ("channel", "patch", "ntkcl") for n in ns]
    # kernels of at most as many images per task as the smallest task has
    runs = grid_runs(grid, lambda ov: dict(quick, **{"train.record_ntk_per_task": min(
        int(config.train.record_ntk_per_task),
        int(ov["data.max_per_class_train"]) * int(config.data.increment))}))
    ratio = views_rank_ratio(base_runs[0])
    out["c"] = sample_size_and_views(runs, ratio, png("c"))
    save()
  return out


def markdown(report: Mapping[str, dict], plot_prefix: str = "") -> str:
  """The theory checks as a markdown section (prediction, measurement, verdict, plot)."""
  names = {"a": "Inter-task overlap vs forgetting", "b": "Orthogonality term",
           "c": "Gap vs sample size and views", "d": "Lazy regime",
           "e": "Per-task spectra and drift", "f": "Regularisation and EMA"}
  lines = []
  for k in sorted(report):
    r = report[k]
    verdict = {True: "holds", False: "**fails**", None: "undecided"}[r.get("holds")]
    lines += [f"### ({k}) {names[k]}", "", f"- Paper / literature: {r['prediction']}",
              f"- Measured: {r['measured']}", f"- Verdict: {verdict}", ""]
    if r.get("plot"):
      lines += [f"![({k})]({plot_prefix}{r['plot']})", ""]
  return "\n".join(lines)


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache: the grid's runs share shapes, so later runs skip most compiles."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _define_flags() -> None:
  """Registers the CLI's flags (only when run as a program)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/tiny.py:data=digits",
                                  "base config of every run (overrides: --config.KEY=VALUE)")
  flags.DEFINE_string("root", "", "directory of the runs, theory.json and the plots")
  flags.DEFINE_list("seeds", ["0"], "seeds of every run")
  flags.DEFINE_string("experiments", "abcdef", "which of a-f to run")
  flags.DEFINE_bool("compilation_cache", False, "persistent XLA cache under ROOT/.jax_cache "
                    "(later runs of the grid skip most compiles; XLA logs each cache load)")
  flags.DEFINE_list("reg_temps", [str(r) for r in REG_TEMPS], "(f): reg_temp values")
  flags.DEFINE_list("n_per_class", [], "(c): training images per class (default: 1/4, 1/2, 1 "
                    "of the config's data.max_per_class_train)")


def main(_) -> None:
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  if not fl["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not fl.root:
    raise app.UsageError("--root is required")
  bad = set(fl.experiments) - set("abcdef")
  if bad:
    raise app.UsageError(f"--experiments={fl.experiments}: unknown {sorted(bad)}; use letters a-f")
  fl.config.train.mesh_data, fl.config.train.mesh_model = 1, 1
  if fl.compilation_cache:
    enable_compilation_cache(os.path.join(fl.root, ".jax_cache"))
  os.makedirs(fl.root, exist_ok=True)
  with open(os.path.join(fl.root, "command.txt"), "w") as f:  # for docs/ntk.md
    f.write("python -m ntk_analysis.theory " + " ".join(sys.argv[1:]) + "\n")
  out = run_all(fl.config, fl.root, [int(s) for s in fl.seeds], fl.experiments,
                [int(n) for n in fl.n_per_class], [float(r) for r in fl.reg_temps])
  for k, r in sorted(out.items()):
    print(f"({k}) prediction: {r['prediction']}\n    measured: {r['measured']}\n"
          f"    holds: {r['holds']}")
  print("wrote", os.path.join(fl.root, "theory.json"))


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
