"""Experiments (a)-(f) of docs/ntk_theory.md §4, one function each: a tidy table with the paper's
prediction beside the measurement, a verdict and a plot. They read finished runs (a workdir with
results.json and its task-end kernels, joint.task_end_path) or kernels already computed; the
sweep that trains the runs is scripts/theory.py, the kernels come from ntk_analysis.analyse.

(a) overlap_vs_forgetting  rho_{s,t} and principal cosines at theta_t^0 vs the accuracy task s
                           loses while task t trains
(b) orthogonality          dis_temp x NCE sign: inter-task alignment and forgetting
(c) sample_size_and_views  branch x images per class: final generalisation gap and its log-log
                           slope; view_ranks: effective rank of one view against the three stacked
(d) lazy_regime            kernel distance to the task-start kernel and linearisation error,
                           checkpoint by checkpoint
(e) spectra_and_drift      per-task spectra at theta_t and theta_T, old-task kernel drift
(f) regularisation_ema     reg_temp x EMA sets: forgetting, plasticity, old-kernel drift
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import pandas as pd

from ntk_analysis import joint, metrics, plots
from ntkcl_jax import data
from ntkcl_jax.checkpoints import runs

PREDICTIONS = {
    "a": "forgetting of task s while task t trains grows with their inter-task kernel overlap "
         "(positive rank correlation; Doan et al., NTK-CL's interplay term)",
    "b": "a stronger orthogonality term (dis_temp) lowers inter-task alignment and forgetting; "
         "with the official signed-sum term at weight 1e-4 expect about no effect",
    "c": "gaps fall like N^-1/2 (log-log slope about -0.5); both branches (3 views) have a gap no "
         "larger than one branch; 'N -> 3N' needs an effective-rank ratio near 3",
    "d": "if the NTK picture applies, the kernel distance S to the task-start kernel and the "
         "linearisation error stay << 1 after the first few percent of a task",
    "e": "fast spectral decay (few dominant directions); old-task kernels drift little (EMA "
         "maintains the intra-task NTK)",
    "f": "final accuracy is U-shaped in the regularisation weight; EMA sets reduce old-kernel "
         "drift",
}
NAMES = {"a": "Inter-task overlap vs forgetting", "b": "Orthogonality term",
         "c": "Gap vs sample size and views", "d": "Lazy regime",
         "e": "Per-task spectra and drift", "f": "Regularisation and EMA"}


def results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def task_kernel(workdir: str, t: int) -> joint.JointKernel:
  """The fused-view joint kernel at the end of task t (theta_t = theta_{t+1}^0)."""
  path = joint.task_end_path(workdir, t)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} missing: compute the task-end kernels with `python -m "
                            f"ntk_analysis.analyse --workdir={workdir} --task_ends`")
  return joint.JointKernel.load(path)


def old_kernel_drift(workdir: str, num_tasks: int) -> float:
  """Mean over old tasks s of S(K_ss(theta_s), K_ss(theta_T))."""
  last = task_kernel(workdir, num_tasks - 1)
  return float(np.mean([metrics.kernel_distance(task_kernel(workdir, s).block(s, s),
                                                last.block(s, s))
                        for s in range(num_tasks - 1)]))


def _summary_row(workdir: str) -> dict:
  r = results(workdir)
  acc = np.array(r["accuracy_matrix"], np.float64)
  return {"avg_acc": r["avg_incremental_accuracy"], "last_acc": r["last_accuracy"],
          "forgetting": r["forgetting"], "plasticity": float(np.mean(np.diag(acc)))}


def _result(key: str, table: pd.DataFrame, measured: str, holds, plot: Optional[str]) -> dict:
  return {"experiment": key, "prediction": PREDICTIONS[key], "measured": measured,
          "holds": holds, "table": table.to_dict("records"),
          "plot": os.path.basename(plot) if plot else None}


# -- (a) ---------------------------------------------------------------------------------------
def pair_row(jk: joint.JointKernel, s, t, top_k: int = 3) -> dict:
  """Overlap of tasks s and t in one joint kernel: rho, the mean of the top-k principal cosines
  of their tangent spaces, and the mean |tangent cosine| between their samples."""
  ang = metrics.principal_angles_blocks(jk.block(s, s), jk.block(t, t), jk.block(s, t))
  cos = metrics.tangent_cosines(jk.k)[np.ix_(jk.rows(s), jk.rows(t))]
  return {"rho": jk.alignment(s, t),
          "principal_cos_topk": float(ang[:top_k].mean()) if ang.size else 0.0,
          "tangent_cos_inter": float(np.abs(cos).mean())}


def overlap_vs_forgetting(workdirs: Sequence[str], plot_path: Optional[str] = None,
                          top_k: int = 3, kernel: Optional[joint.JointKernel] = None) -> dict:
  """(a): per run and pair s < t, the overlap (pair_row) of the kernel at theta_t^0 (the end of
  task t-1) against the drop A[t-1, s] - A[t, s]. `kernel`: one kernel for every t instead of
  the task-end kernels (e.g. the single checkpoint `analyse` read)."""
  rows = []
  for wd in workdirs:
    acc = np.array(results(wd)["accuracy_matrix"], np.float64)
    for t in range(1, acc.shape[0]):
      jk = kernel if kernel is not None else task_kernel(wd, t - 1)
      for s in range(t):
        rows.append({"run": os.path.basename(os.path.normpath(wd)), "s": s, "t": t,
                     **pair_row(jk, s, t, top_k),
                     "accuracy_drop": float(acc[t - 1, s] - acc[t, s])})
  df = pd.DataFrame(rows)
  corr = {c: metrics.spearman(df[c], df["accuracy_drop"]) if len(df) else float("nan")
          for c in ("rho", "principal_cos_topk")}
  if plot_path and len(df):
    plots.overlap_vs_forgetting(df, corr, plot_path)
  where = "" if kernel is None else f" (one kernel, checkpoint {kernel.meta.get('checkpoint')})"
  c_rho = corr["rho"]
  return _result("a", df, f"Spearman(rho, drop) = {c_rho:.2f}, Spearman(principal cos, drop) = "
                 f"{corr['principal_cos_topk']:.2f} over {len(df)} task pairs{where}",
                 bool(c_rho > 0) if np.isfinite(c_rho) else None, plot_path)


# -- (b) ---------------------------------------------------------------------------------------
def orthogonality(runs_: Mapping[str, Mapping[str, object]], plot_path: Optional[str] = None
                  ) -> dict:
  """(b): {workdir: overrides} -> mean inter-task alignment at theta_T and forgetting per run."""
  rows = []
  for wd, ov in runs_.items():
    r = results(wd)
    jk = task_kernel(wd, len(r["accuracy_matrix"]) - 1)
    rows.append({"dis_temp": float(ov.get("method.dis_temp", 1e-4)),
                 "nce_sign": "flipped" if ov.get("method.fix_nce_sign") else "official",
                 "seed": r["config"]["seed"], "mean_rho": jk.mean_inter_alignment(),
                 **_summary_row(wd)})
  df = pd.DataFrame(rows)
  g = df.groupby(["nce_sign", "dis_temp"], as_index=False)[["mean_rho", "forgetting"]].mean()
  effect = {sign: (float(d["mean_rho"].iloc[-1] - d["mean_rho"].iloc[0]),
                   float(d["forgetting"].iloc[-1] - d["forgetting"].iloc[0]))
            for sign, d in g.groupby("nce_sign")}
  if plot_path:
    plots.sweep(plot_path, g, "nce_sign", "dis_temp",
                [(0, "mean_rho", "o-", "NCE sign {}"), (1, "forgetting", "o-", "NCE sign {}")],
                ("mean inter-task rho at theta_T", "forgetting (points)"))
  measured = "; ".join(f"NCE sign {s}: dis_temp 0 -> {g['dis_temp'].max():g} changes mean rho "
                       f"by {dr:+.2g} and forgetting by {df_:+.2f} points"
                       for s, (dr, df_) in effect.items())
  holds = bool(all(dr < 0 for dr, _ in effect.values())) if effect else None
  return _result("b", df, measured, holds, plot_path)


# -- (c) ---------------------------------------------------------------------------------------
def view_ranks(kernels_by_view: Mapping[str, joint.JointKernel]) -> dict:
  """(c), views: mean intra-task effective rank and inter-task alignment per view, and the ratio
  of the stacked views' rank to the fused view's ('N -> 3N' needs about 3)."""
  rows = [{"view": v, "mean_intra_effective_rank": float(np.mean(
      [metrics.effective_rank(jk.block(t, t)) for t in jk.tasks])),
           "mean_inter_alignment": jk.mean_inter_alignment()}
          for v, jk in kernels_by_view.items()]
  r_eff = {r["view"]: r["mean_intra_effective_rank"] for r in rows}
  holds, ratio = None, None
  if "all" in r_eff and len(r_eff) > 1:
    holds = bool(r_eff["all"] > max(v for k, v in r_eff.items() if k != "all"))
  if "all" in r_eff and "fused" in r_eff and r_eff["fused"] > 0:
    ratio = r_eff["all"] / r_eff["fused"]
  return {"table": rows, "r_eff": r_eff, "ratio_all_over_fused": ratio, "holds": holds,
          "prediction": "stacked views give a higher intra-task effective rank than one view"}


def split_accuracies(workdir: str) -> pd.DataFrame:
  """Per task: accuracy at theta_T on its training images (test transform) and on its test
  images, each over all seen classes (the learner's own evaluation)."""
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


def sample_size_and_views(runs_: Mapping[str, Mapping[str, object]],
                          views: Optional[dict] = None, plot_path: Optional[str] = None) -> dict:
  """(c): {workdir: overrides} over method.name x data.max_per_class_train -> mean final gap
  (train minus test accuracy at theta_T) and its log-log slope against N per method; `views`:
  view_ranks of one run."""
  rows = []
  for wd in runs_:
    gaps = split_accuracies(wd)
    r = results(wd)
    rows.append({"method": r["config"]["method"]["name"], "seed": r["config"]["seed"],
                 "n_per_class": int(r["config"]["data"]["max_per_class_train"]),
                 "gap": float(gaps["gap"].mean()), "train_acc": float(gaps["train_acc"].mean()),
                 "test_acc": float(gaps["test_acc"].mean()), **_summary_row(wd)})
  df = pd.DataFrame(rows)
  g = df.groupby(["method", "n_per_class"], as_index=False)[["gap", "test_acc"]].mean()
  slopes = {m: metrics.loglog_slope(d["n_per_class"], d["gap"]) for m, d in g.groupby("method")}
  n_max = g["n_per_class"].max()
  at_max = g[g["n_per_class"] == n_max].set_index("method")["gap"].to_dict()
  parts = ["log-log slope of gap vs N: " + ", ".join(f"{m} {s:.2f}" for m, s in slopes.items()),
           f"gap at N={n_max}: " + ", ".join(f"{m} {v:.1f}" for m, v in at_max.items())]
  holds = None
  if "ntkcl" in at_max and len(at_max) > 1:
    holds = bool(at_max["ntkcl"] <= min(v for m, v in at_max.items() if m != "ntkcl"))
  if views and views.get("ratio_all_over_fused") is not None:
    parts.append(f"r_eff(3 views) / r_eff(fused) = {views['ratio_all_over_fused']:.2f}")
  if plot_path:
    plots.sample_size_and_views(g, slopes, views, plot_path)
  res = _result("c", df, "; ".join(parts), holds, plot_path)
  res["slopes"], res["views"] = slopes, views
  return res


# -- (d) ---------------------------------------------------------------------------------------
def lazy_regime(checkpoints: Iterable[dict], plot_path: Optional[str] = None) -> dict:
  """(d): over consecutive checkpoints of one run (ntk_analysis.analyse.every_checkpoint: dicts
  with checkpoint, step, task, kernel, f, params, x), S to the kernel at the task's first
  checkpoint and e_lin from the previous checkpoint of the same task."""
  rows, ref, prev = [], {}, None
  for c in checkpoints:
    task, k = c["task"], c["kernel"].k
    ref.setdefault(task, k)  # theta_task^0: the first checkpoint of this task
    e_lin = float("nan")
    if prev is not None and prev["task"] == task:
      e_lin = metrics.linearisation_error(prev["f"], prev["params"], c["params"], c["x"])
    rows.append({"checkpoint": c["checkpoint"], "step": c["step"], "task": task,
                 "S_to_task_start": metrics.kernel_distance(ref[task], k),
                 "relative_change": metrics.relative_change(ref[task], k), "e_lin": e_lin})
    prev = c
  df = pd.DataFrame(rows)
  within = df[df["step"] > df.groupby("task")["step"].transform("min")]
  s_end = df.groupby("task")["S_to_task_start"].last()
  e_med = float(np.nanmedian(within["e_lin"])) if len(within) else float("nan")
  if plot_path:
    plots.lazy_regime(df, plot_path)
  measured = ("S at task end per task: " + ", ".join(f"{v:.2g}" for v in s_end) +
              f"; median e_lin between checkpoints {e_med:.2g}")
  holds = bool(s_end.max() < 0.1 and e_med < 0.1) if np.isfinite(e_med) else None
  return _result("d", df, measured, holds, plot_path)


# -- (e) ---------------------------------------------------------------------------------------
def spectra_and_drift(workdir: str, plot_path: Optional[str] = None) -> dict:
  """(e): per task t, the spectrum of K_tt at theta_t and theta_T (top-3 eigenvalue share,
  effective rank) and the drift S(K_tt(theta_t), K_tt(theta_T)); `spectra` holds the
  trace-normalised eigenvalues (tidy: task, at, index, eigenvalue)."""
  num_tasks = len(results(workdir)["accuracy_matrix"])
  last = task_kernel(workdir, num_tasks - 1)
  rows, spec = [], []
  for t in range(num_tasks):
    own = task_kernel(workdir, t)
    for when, jk in (("theta_t", own), ("theta_T", last)):
      w = metrics.spectrum(jk.block(t, t))
      w = w / w.sum()
      spec += [{"task": t, "at": when, "index": i, "eigenvalue": float(v)}
               for i, v in enumerate(w)]
      rows.append({"task": t, "at": when, "top3_share": float(w[:3].sum()),
                   "effective_rank": metrics.effective_rank(jk.block(t, t)), "n": int(len(w)),
                   "drift_S": metrics.kernel_distance(own.block(t, t), last.block(t, t))})
  df, spec = pd.DataFrame(rows), pd.DataFrame(spec)
  old = df[(df["at"] == "theta_T") & (df["task"] < num_tasks - 1)]
  top3, drift = float(df["top3_share"].mean()), float(old["drift_S"].mean())
  if plot_path:
    plots.spectra_and_drift(spec, old, plot_path)
  n = int(df["n"].iloc[0])
  res = _result("e", df, f"top-3 eigenvalues hold {100 * top3:.0f}% of the trace of a {n}x{n} "
                f"task kernel; mean old-task drift S = {drift:.2g}",
                bool(top3 > 0.5 and drift < 0.1), plot_path)
  res["spectra"] = spec.to_dict("records")
  return res


# -- (f) ---------------------------------------------------------------------------------------
def regularisation_ema(runs_: Mapping[str, Mapping[str, object]],
                       plot_path: Optional[str] = None) -> dict:
  """(f): {workdir: overrides} over reg_temp x frozen_sets -> accuracy, forgetting, plasticity
  and old-task kernel drift."""
  rows = []
  for wd, ov in runs_.items():
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
    plots.sweep(plot_path, g, "ema_sets", "reg_temp",
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


def markdown(report: Mapping[str, dict], plot_prefix: str = "") -> str:
  """Experiment results as a markdown section (prediction, measurement, verdict, plot)."""
  lines = []
  for k in sorted(report):
    r = report[k]
    verdict = {True: "holds", False: "**fails**", None: "undecided"}[r.get("holds")]
    lines += [f"### ({k}) {NAMES[k]}", "", f"- Paper / literature: {r['prediction']}",
              f"- Measured: {r['measured']}", f"- Verdict: {verdict}", ""]
    if r.get("plot"):
      lines += [f"![({k})]({plot_prefix}{r['plot']})", ""]
  return "\n".join(lines)
