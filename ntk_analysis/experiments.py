"""Experiments (a)-(f) of docs/ntk_theory.md §4 in two halves: measuring one run, and judging a
sweep of runs over seeds.

Measuring (`measure_run`, one finished run read from its saved checkpoints) gives the run's
kernel quantities as a small JSON-ready dict, which scripts/theory.py stores in the run's
record.json before the checkpoints are deleted. Parts (docs/ntk_theory.md §2.2 for every name):
  'pairs'   fused-view joint kernels over fixed per-task probe images at every task end
            theta_t (= theta_{t+1}^0). Per pair s < tau at theta_tau^0: rho_{s,tau}, the mean
            top-k principal cosine, both also on the centred kernel H K H. Per task: raw and
            centred spectra of K_tt at theta_t and theta_T, and the drift S(K_tt(theta_t),
            K_tt(theta_T)).
  'views'   each task's stacked 3n x 3n multi-view kernel (channel, patch, fused) at theta_T and
            the effective ranks of it and of each single view's n x n kernel.
  'lazy'    per task t, over the whole task: S(K(theta_t^0), K(theta_t)), e_lin with
            Delta = theta_t - theta_t^0, and a linearised run (function-space SGD with the eNTK
            frozen at theta_t^0: same CE terms, steps, learning rates and momentum) against the
            real network (accuracy and per-example agreement on held-out test images).
  'groups'  each parameter group's share of the trace of the kernel and of the centred kernel at
            theta_T (param_groups.NTKCL_GROUPS).
  'gap'     per task, accuracy at theta_T on its training images and on its test images.
  'nt_check' the fused kernel at theta_T computed once more through neural-tangents (the `ntk`
            extra), and its agreement with the JAX backend's kernel the other parts use.

Judging (`Sweep` of records; every function returns the paper's prediction, the criterion fixed
before measuring, findings with bootstrap intervals over seeds (ntkcl_jax.evidence) and verdicts):
  (a) interference            rho at theta_tau^0 vs the accuracy task s loses while tau trains,
                              task age (tau - s) partialled out; per-lag correlations
  (b) orthogonality           dis_temp arms (official signed sum, fix_orth) vs the zero weight
  (c) views_and_sample_size   stacked-view / fused-view effective rank; gap vs N (log-log slope)
  (d) laziness                e_lin and agreement of the linearised run over whole tasks
  (e) spectra_and_groups      centred spectra, group trace shares, raw vs centred rho
  (f) regularisation_and_ema  reg_temp sweep (U shape) and EMA vs copy of the frozen sets
A verdict needs an interval: with one seed every verdict is 'inconclusive'.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import pandas as pd

from ntk_analysis import joint, kernels, linearized, metrics, param_groups, plots, readouts
from ntkcl_jax import evidence
from ntkcl_jax import switches
from ntkcl_jax import results as results_lib

PARTS = ("pairs", "views", "lazy", "groups", "gap", "nt_check")
TOP_K = 3  # principal cosines averaged in (a) and eigenvalues in the (e) share

# Criteria, fixed before measuring (docs/ntk.md prints them next to each result).
RHO_MARGIN = 0.01  # |Delta mean rho| that counts as no effect: below the spread between tasks
ACC_MARGIN = 1.0  # |Delta| in accuracy points that counts as no effect
VIEW_RATIO = 2.0  # 'N -> 3N' if r_eff(stacked) / r_eff(fused) lies above this
SLOPE = -0.5  # the N^-1/2 rate of the gap ...
SLOPE_MARGIN = 0.25  # ... is matched if the slope's interval lies within SLOPE +- this
E_LIN_MAX = 0.3  # lazy: e_lin below this ...
AGREEMENT_MIN = 0.9  # ... and the linearised run agrees with the network on more than this
TOP_SHARE_MIN = 0.5  # fast decay: the top-3 eigenvalues of the centred kernel hold more

NAMES = {"a": "Inter-task overlap vs forgetting", "b": "Orthogonality term",
         "c": "Views and sample size", "d": "Lazy regime", "e": "Spectra and parameter groups",
         "f": "Regularisation and EMA"}
PREDICTIONS = {
    "a": "forgetting of task s while task tau trains grows with their inter-task kernel overlap "
         "at theta_tau^0 (Doan et al.; NTK-CL's task-interplay term)",
    "b": "a positive orthogonality weight lowers the inter-task overlap and forgetting (paper); "
         "the official term is a signed sum, a linear functional of the features "
         "(docs/method.md §2.4), so for it the code-level expectation is no effect",
    "c": "the three views (channel, patch, fused) act like 3N samples ('N -> 3N'); the "
         "generalisation gap falls like N^-1/2",
    "d": "training a task stays close to its linearisation at theta_t^0 (the NTK picture applies)",
    "e": "few dominant kernel directions per task (fast spectral decay)",
    "f": "final accuracy is U-shaped in the regularisation weight; the EMA of the frozen sets "
         "keeps old tasks' kernels (less drift) and helps accuracy",
}
CRITERIA = {
    "a": "prediction '>0' for the partial Spearman correlation of rho_{s,tau} with "
         "DeltaA(s<-tau) = A[tau-1, s] - A[tau, s] given the lag tau - s, pooled over all "
         "pairs s < tau of all seeds; interval: bootstrap over seeds (whole seeds resampled). "
         "Holds if the interval lies above 0, fails if below.",
    "b": f"each arm against the zero-weight control of the same seed (dis_temp = 0, nothing "
         f"else changed). Paper: Delta mean rho < 0 and Delta forgetting < 0. For the official "
         f"arms also '= 0': holds if the whole interval lies within +-{RHO_MARGIN} (rho) or "
         f"+-{ACC_MARGIN:g} points (forgetting, A_T).",
    "c": f"'N -> 3N' holds if the interval of r_eff(stacked 3n x 3n) / r_eff(fused n x n) "
         f"lies above {VIEW_RATIO:g} and fails if below: {VIEW_RATIO:g} is midway between 1 "
         f"(three copies of one view add nothing) and 3 (three independent views). Gap: the "
         f"log-log slope of (train - test accuracy at theta_T, mean over tasks) against images "
         f"per class N, per seed, every N trained for the base's SGD steps per task (epochs "
         f"scaled by N_base / N, so N alone changes); '<0' holds if its interval lies below 0; it matches N^-1/2 if the interval "
         f"lies within {SLOPE:g} +- {SLOPE_MARGIN:g}.",
    "d": f"lazy if e_lin < {E_LIN_MAX:g} and the linearised run's agreement with the network "
         f"> {AGREEMENT_MIN:g}, each read off its interval over seeds (means over tasks 1..T-1; "
         f"task 0 starts at the zero-initialised adapters, whose down-projections have a zero "
         f"kernel, docs/ntk_theory.md §1.5, and is shown apart). Holds if both intervals lie "
         f"on the lazy side, fails if either lies on the other.",
    "e": f"fast decay if the top-3 eigenvalues of the centred task kernel H K_tt H hold more "
         f"than {TOP_SHARE_MIN:g} of its trace (mean over tasks at theta_t; a flat spectrum "
         f"of n = 16 samples would give about 0.2). Holds if the interval lies above "
         f"{TOP_SHARE_MIN:g}, fails if below.",
    "f": "U shape: an interior reg_temp beats both ends of the sweep (paired differences in "
         "A_T, each '>0'; the interior value is chosen on the other seeds, leave-one-seed-"
         "out). EMA: the 'copy' arm overwrites the frozen set with the last task's values at "
         "the same architecture; separate verdicts for old-task kernel drift (EMA - copy '<0') "
         "and accuracy (A_T: EMA - copy '>0').",
}


# -- measuring one run ---------------------------------------------------------------------------
def _rounded(x, digits: int = 6):
  """JSON-ready copy with floats to `digits` significant digits (records stay small)."""
  if isinstance(x, dict):
    return {str(k): _rounded(v, digits) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_rounded(v, digits) for v in x]
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.ndarray):
    return _rounded(x.tolist(), digits)
  return x


def split_images(stream, split: str, classes) -> tuple[np.ndarray, np.ndarray]:
  """(model inputs, labels) of one task's images: split 'proto' (training images, test
  transform) or 'test'."""
  xs, ys = [], []
  for batch in stream.eval_batches(split, classes, 64):
    m = np.asarray(batch["mask"])
    xs.append(stream.model_input(np.asarray(batch["image"])[m]))
    ys.append(np.asarray(batch["label"])[m])
  return np.concatenate(xs), np.concatenate(ys)


def _spectrum_row(k) -> dict:
  """Raw and centred spectrum facts of one task block."""
  kc = metrics.centre(k)
  w, wc = metrics.spectrum(k), metrics.spectrum(kc)
  return {"trace": float(np.trace(k)), "top3_share": metrics.top_share(k, TOP_K),
          "top3_share_centred": metrics.top_share(kc, TOP_K),
          "effective_rank": metrics.effective_rank(k),
          "effective_rank_centred": metrics.effective_rank(kc),
          "spectrum": (w / w.sum()).tolist() if w.sum() > 0 else [],
          "spectrum_centred": (wc / wc.sum()).tolist() if wc.sum() > 0 else []}


def _pair_row(k, kc, rows_s, rows_t) -> dict:
  """Overlap of two tasks' probe rows in one joint kernel k and its centred version kc."""
  out = {}
  for tag, m in (("", k), ("_centred", kc)):
    b = lambda r, c: m[np.ix_(r, c)]  # noqa: E731
    ang = metrics.principal_angles_blocks(b(rows_s, rows_s), b(rows_t, rows_t), b(rows_s, rows_t))
    out["rho" + tag] = metrics.alignment(b(rows_s, rows_s), b(rows_t, rows_t), b(rows_s, rows_t))
    out["principal_cos_topk" + tag] = float(ang[:TOP_K].mean()) if ang.size else 0.0
  return out


def _logit_readout(learner, state, n_new: int):
  """(f, params, heads): the proxy-head logits the task's CE terms train, f(q, x) -> (B, V*n)
  for the V features the method's loss puts through the head (ntkcl: channel, patch, fused;
  other methods: fused), q = the readout's PEFT tree plus the proxy head."""
  from ntkcl_jax.models import peft  # pylint: disable=g-import-not-at-top
  views = readouts.VIEWS if learner.spec.method == "ntkcl" else ("fused",)
  eye = np.eye(learner.spec.feature_dim, dtype=np.float32)
  f_feat, params = readouts.model_readout(learner, state, "all" if len(views) > 1 else "fused",
                                          eye)

  def f(q, x):
    z = f_feat({k: v for k, v in q.items() if k != "proxy"}, x)
    z = z.reshape(z.shape[0], len(views), -1)
    return peft.cosine_logits(z, q["proxy"])[..., :n_new].reshape(z.shape[0], -1)
  return f, dict(params, proxy=state["params"]["proxy"]), len(views)


def _linearised_task(learner, stream, config, t, s0, s1, images, labels, test, n_train, n_test,
                     seed, ntk_kwargs) -> dict:
  """(d) for task t: the linearised run from theta_t^0 (state s0) against the network at
  theta_t (s1: the trained parameters with s0's frozen sets), on held-out images of the task."""
  from ntkcl_jax import learner as learner_lib  # pylint: disable=g-import-not-at-top
  classes = [int(c) for c in np.asarray(stream.tasks[t]).reshape(-1)]
  local = {c: i for i, c in enumerate(classes)}
  rng = np.random.default_rng([seed, t, 0x11])
  tr = np.sort(rng.choice(len(images[t]), min(n_train, len(images[t])), replace=False))
  te = np.sort(rng.choice(len(test[0]), min(n_test, len(test[0])), replace=False))
  x = np.concatenate([images[t][tr], test[0][te]])
  y_tr = np.array([local[int(c)] for c in labels[t][tr]])
  y_te = np.array([local[int(c)] for c in test[1][te]])
  f, q0, heads = _logit_readout(learner, s0, len(classes))
  _, q1, _ = _logit_readout(learner, s1, len(classes))
  k = kernels.ntk_fn(f, trace=False, **ntk_kwargs)(q0, x)
  f0, f_real = np.asarray(f(q0, x), np.float64), np.asarray(f(q1, x), np.float64)
  epochs = learner.epochs()
  nb = stream.num_train_batches(t, config.optim.batch_size)
  lrs = [learner_lib.cosine_lr(config.optim.lr, e, epochs) for e in range(epochs)
         for _ in range(nb)]
  f_lin = linearized.function_space_sgd(k, f0, np.arange(len(tr)), y_tr, lrs,
                                        config.optim.momentum, heads)
  rows = np.arange(len(tr), len(x))
  fused = slice((heads - 1) * len(classes), heads * len(classes))  # the fused view's head
  p_real, p_lin = f_real[rows, fused].argmax(-1), f_lin[rows, fused].argmax(-1)
  moved = np.linalg.norm(f_real[rows] - f0[rows])
  return {"steps": len(lrs), "n_train": int(len(tr)), "n_test": int(len(te)),
          "acc_real": float(np.mean(p_real == y_te)), "acc_lin": float(np.mean(p_lin == y_te)),
          "agreement": float(np.mean(p_real == p_lin)),
          "e_fun": float(np.linalg.norm(f_lin[rows] - f_real[rows]) / moved) if moved > 0
                   else 0.0}


def measure_run(workdir: str, parts: Sequence[str] = PARTS, *, n_per_task: int = 16,
                num_probes: int = 8, lin_train: int = 32, lin_test: int = 32,
                log: Callable[[str], None] = print, **ntk_kwargs) -> dict:
  """The kernel quantities of one finished run (module docstring) from its task-end
  checkpoints, which must all be kept. Probe images and sketch probes are drawn from the run's
  seed, so the arms of one seed share them. `ntk_kwargs` configure kernels.ntk_fn (chunk,
  memory_limit, backend, ...)."""
  from ntk_analysis import analyse  # pylint: disable=g-import-not-at-top  # analyse imports us
  from ntkcl_jax import data  # pylint: disable=g-import-not-at-top
  from ntkcl_jax.checkpoints import runs  # pylint: disable=g-import-not-at-top
  bad = sorted(set(parts) - set(PARTS))
  if bad:
    raise ValueError(f"unknown parts {bad}; choose from {PARTS}")
  t0 = time.time()
  ends = analyse.task_end_checkpoints(workdir)
  config, learner, _, _ = runs.load_run(workdir, ends[max(ends)])
  stream = data.build_stream(config)
  num_tasks = stream.num_tasks
  missing = sorted(set(range(num_tasks)) - set(ends))
  if missing:
    raise FileNotFoundError(f"{workdir}: no checkpoint of the end of tasks {missing}; retrain "
                            f"with --config.train.checkpoint_every_steps=0 "
                            f"--config.train.keep_checkpoints={num_tasks + 1}")
  seed = int(config.seed)
  states = [runs.restore_state(workdir, learner, ends[t])[0] for t in range(num_tasks)]
  images, labels = analyse.task_data(stream)
  n = min([n_per_task] + [len(images[t]) for t in range(num_tasks)])
  idx = {t: joint.subset_indices(seed, t, len(images[t]), n) for t in range(num_tasks)}
  x = np.concatenate([images[t][idx[t]] for t in range(num_tasks)])
  rows = {t: np.arange(t * n, (t + 1) * n) for t in range(num_tasks)}
  probe = readouts.probes(learner.spec.feature_dim, num_probes, seed)

  def fused_kernel(state, params=None):
    f, p = readouts.model_readout(learner, state, "fused", probe)
    return kernels.ntk_fn(f, **ntk_kwargs)(p if params is None else params, x)

  out: dict = {"parts": list(parts), "n_per_task": n, "probes": num_probes,
               "counts": stream.counts, "tasks_classes": [np.asarray(c).reshape(-1).tolist()
                                                          for c in stream.tasks],
               "steps_per_task": [learner.epochs() * stream.num_train_batches(
                   t, config.optim.batch_size) for t in range(num_tasks)]}
  views = "views" in parts and learner.spec.method == "ntkcl"
  k_end, k_mv = [], None
  for t in range(num_tasks):
    if views and t == num_tasks - 1:  # one stacked kernel: its fused diagonal is the fused one
      f_all, p = readouts.model_readout(learner, states[t], "all", probe)
      f_mv = lambda q, xx, f_all=f_all: f_all(q, xx).reshape(xx.shape[0], 3, -1)  # noqa: E731
      k_mv = kernels.ntk_fn(f_mv, **ntk_kwargs)(p, x)  # (N, N, 3, 3) over VIEWS
      k_end.append(np.asarray(k_mv[:, :, 2, 2]))
    else:
      k_end.append(fused_kernel(states[t]))
    log(f"  kernel at the end of task {t}: {x.shape[0]} images, {time.time() - t0:.0f} s")
  last = k_end[-1]
  if "pairs" in parts:
    centred = [metrics.centre(k) for k in k_end]
    out["pairs"] = [{"s": s, "t": t, **_pair_row(k_end[t - 1], centred[t - 1], rows[s], rows[t])}
                    for t in range(1, num_tasks) for s in range(t)]
    out["tasks"] = []
    for t in range(num_tasks):
      own, fin = k_end[t][np.ix_(rows[t], rows[t])], last[np.ix_(rows[t], rows[t])]
      out["tasks"].append({
          "task": t, "at_t": _spectrum_row(own), "at_T": _spectrum_row(fin),
          "drift_S": metrics.kernel_distance(own, fin),
          "drift_S_centred": metrics.kernel_distance(metrics.centre(own), metrics.centre(fin)),
          "relative_drift": metrics.relative_change(own, fin)})
  if views:
    per = []
    for t in range(num_tasks):
      blk = k_mv[np.ix_(rows[t], rows[t])]  # (n, n, 3, 3)
      big = kernels.multiview_matrix(blk)
      r = {v: metrics.effective_rank(blk[:, :, i, i]) for i, v in enumerate(readouts.VIEWS)}
      rc = {v: metrics.effective_rank(metrics.centre(blk[:, :, i, i]))
            for i, v in enumerate(readouts.VIEWS)}
      r["stacked"], rc["stacked"] = metrics.effective_rank(big), metrics.effective_rank(
          metrics.centre(big))
      per.append({"task": t, "r_eff": r, "r_eff_centred": rc})
    out["views"] = {"at": "theta_T", "per_task": per}
  log(f"  spectra, pairs and views: {time.time() - t0:.0f} s")
  if "groups" in parts:
    f, p = readouts.model_readout(learner, states[-1], "fused", probe)
    tr = param_groups.group_traces(f, p, x, param_groups.NTKCL_GROUPS)
    tot = sum(v["trace"] for v in tr.values())
    tot_c = sum(v["centred"] for v in tr.values())
    out["groups"] = {"at": "theta_T", "shares": {g: v["trace"] / tot for g, v in tr.items()},
                     "shares_centred": {g: v["centred"] / tot_c for g, v in tr.items()},
                     "excluded_inert": list(readouts.inert_fusion_parameters(learner.spec))}
    log(f"  group trace shares: {time.time() - t0:.0f} s")
  if "gap" in parts:
    all_classes = [int(c) for t in range(num_tasks)
                   for c in np.asarray(stream.tasks[t]).reshape(-1)]
    ev = learner.evaluate(states[-1], num_tasks - 1,
                          stream.eval_batches("proto", all_classes,
                                              config.optim.eval_batch_size), stream.tasks)
    test = _results(workdir)["accuracy_matrix"][-1]
    out["gap"] = [{"task": t, "train_acc": ev["per_task_accuracy"][t], "test_acc": test[t]}
                  for t in range(num_tasks)]
    log(f"  accuracy on training images: {time.time() - t0:.0f} s")
  if "lazy" in parts and learner.epochs() > 0:
    lazy = []
    for t in range(num_tasks):
      prev = (states[t - 1] if t else
              learner.init_state(jax.random.PRNGKey(seed)))  # what training started task t from
      s0 = learner.start_task(prev)  # theta_t^0: fresh proxy head, as training drew it
      s1 = dict(s0, params=states[t]["params"])  # theta_t with the frozen sets it trained with
      f0, p0 = readouts.model_readout(learner, s0, "fused", probe)
      _, p1 = readouts.model_readout(learner, s1, "fused", probe)
      k0 = k_end[t - 1] if t else fused_kernel(s0)  # the start state's readout is theta_{t-1}'s
      k1 = kernels.ntk_fn(f0, **ntk_kwargs)(p1, x)
      row = {"task": t, "S": metrics.kernel_distance(k0, k1),
             "S_centred": metrics.kernel_distance(metrics.centre(k0), metrics.centre(k1)),
             "relative_change": metrics.relative_change(k0, k1),
             "e_lin": metrics.linearisation_error(f0, p0, p1, x)}
      test = split_images(stream, "test", np.asarray(stream.tasks[t]).reshape(-1))
      row.update(_linearised_task(learner, stream, config, t, s0, s1, images, labels, test,
                                  lin_train, lin_test, seed, ntk_kwargs))
      lazy.append(row)
      log(f"  lazy check of task {t}: e_lin {row['e_lin']:.3g}, agreement "
          f"{row['agreement']:.2f}, {time.time() - t0:.0f} s")
    out["lazy"] = lazy
  if "nt_check" in parts:
    out["nt_check"] = nt_agreement(*readouts.model_readout(learner, states[-1], "fused", probe),
                                   x, last)
    log(f"  neural-tangents cross-check: max relative error "
        f"{out['nt_check']['max_rel_error']:.2g}, {time.time() - t0:.0f} s")
  out["measure_seconds"] = time.time() - t0
  return _rounded(out)


def nt_agreement(f, params, x, reference: np.ndarray, implementation: int = 1) -> dict:
  """The traced kernel of f over x through neural-tangents, against `reference` (the JAX
  backend's kernel of the same f, params and x): relative errors and seconds."""
  t = time.time()
  k = kernels.ntk_fn(f, backend="neural_tangents", implementation=implementation)(params, x)
  err = metrics.kernel_agreement(k, reference)
  return {"at": "theta_T", "implementation": implementation, "n": int(k.shape[0]),
          "max_rel_error": err["max_rel"], "frob_rel_error": err["fro_rel"],
          "seconds": time.time() - t}


def _results(workdir: str) -> dict:
  res = results_lib.read(workdir)
  if res is None:
    raise FileNotFoundError(f"{workdir}/results.json not found: the run is not finished")
  return res


# -- a sweep of records --------------------------------------------------------------------------
def flat_config(cfg: Mapping, prefix: str = "") -> dict:
  """{'method.dis_temp': 1e-4, ...}: the keys that name a run (bookkeeping `train.*` and the
  seed left out)."""
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if key in ("train", "seed"):
      continue
    if isinstance(v, Mapping) and v:
      out.update(flat_config(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


@dataclasses.dataclass
class Sweep:
  """The records of one theory sweep (one base config; scripts/theory.py writes one record per
  arm and seed). Arms are recognised by how their config differs from the base arm's."""
  records: list

  @classmethod
  def load(cls, root: str) -> "Sweep":
    recs = []
    for arm in sorted(os.listdir(root)):
      d = os.path.join(root, arm)
      if not os.path.isdir(d):
        continue
      for s in sorted(os.listdir(d)):
        path = os.path.join(d, s, "record.json")
        if os.path.isfile(path):
          with open(path) as f:
            recs.append(json.load(f))
    return cls(recs)

  def arms(self) -> dict:
    """{arm: {seed: record}}."""
    out: dict = {}
    for r in self.records:
      out.setdefault(r["arm"], {})[int(r["seed"])] = r
    return out

  def base(self) -> dict:
    return self.arms().get("base", {})

  def base_flat(self) -> dict:
    base = self.base()
    if not base:
      return {}
    return flat_config(next(iter(base.values()))["config"])

  def differing(self, keys: Iterable[str]) -> dict:
    """{arm: ({seed: record}, flat config)} of the arms (base included) whose config differs
    from the base's only in `keys`."""
    base, keys = self.base_flat(), set(keys)
    out = {}
    for arm, by_seed in self.arms().items():
      flat = flat_config(next(iter(by_seed.values()))["config"])
      diff = {k: flat.get(k) for k in set(flat) | set(base) if flat.get(k) != base.get(k)}
      if set(diff) <= keys:
        out[arm] = (by_seed, flat)
    return out


def _acc(rec) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row]
                   for row in rec["results"]["accuracy_matrix"]], np.float64)


def finding(quantity: str, iv: evidence.Interval, prediction: Optional[str] = None,
            margin: float = 0.0, threshold: float = 0.0, digits: int = 2, note: str = "") -> dict:
  """One row of an experiment's results: the estimate with its interval and n, and (with a
  prediction '>0', '<0' or '=0' about the quantity minus `threshold`) its verdict. Fewer than
  2 seeds (or an undefined estimate) give 'inconclusive'."""
  shifted = iv.shifted(threshold)
  verdict = None
  if prediction is not None:
    if iv.n < 2 or not np.isfinite([iv.estimate, iv.lo, iv.hi]).all():
      verdict = "inconclusive"
      note = "; ".join(x for x in (note, "one seed: no interval" if iv.n < 2 else
                                   "undefined") if x)
    else:
      verdict = evidence.verdict(shifted, prediction, margin)
  pred_text = None
  if prediction is not None:
    pred_text = (f"within ±{margin:g}" + (f" of {threshold:g}" if threshold else " of 0")
                 if prediction == "=0" else f"{prediction[0]} {threshold:g}")
  signed = "Delta" in quantity or " - " in quantity
  if np.isfinite([iv.lo, iv.hi]).all():
    text = iv.text(digits, signed=signed)
  else:
    text = f"{iv.estimate:{'+' if signed else ''}.{digits}f} (n={iv.n}, no interval)"
  return {"quantity": quantity, "prediction": pred_text, "estimate": iv.estimate,
          "lo": iv.lo, "hi": iv.hi, "n": iv.n, "text": text, "verdict": verdict, "note": note}


def _per_seed(groups, stat) -> evidence.Interval:
  """The statistic computed within each seed (e.g. a rank correlation over that seed's task
  pairs), summarised by its Student-t interval over seeds."""
  return evidence.t_interval([stat(*g) for g in groups if len(g[0]) > 2])


def _combine(verdicts: Sequence[str]) -> str:
  """All must hold for 'holds'; any 'fails' fails."""
  if any(v == "fails" for v in verdicts):
    return "fails"
  return "holds" if verdicts and all(v == "holds" for v in verdicts) else "inconclusive"


def _result(key: str, findings: list, verdict: Optional[str], tables: dict, plot=None,
            missing: str = "", headline: str = "") -> dict:
  return {"experiment": key, "name": NAMES[key], "prediction": PREDICTIONS[key],
          "criterion": CRITERIA[key], "findings": findings, "verdict": verdict,
          "headline": headline, "tables": {k: _rounded(v, 4) for k, v in tables.items()},
          "plot": os.path.basename(plot) if plot else None, "missing": missing}


def _missing(key: str, what: str) -> dict:
  return _result(key, [], None, {}, missing=what)


def _mean_rho(rec, col="rho") -> Optional[float]:
  vals = [p[col] for p in rec.get("pairs", [])]
  return float(np.mean(vals)) if vals else None


# (a) -------------------------------------------------------------------------------------------
A_PREDICTORS = (("rho", "rho"), ("rho_centred", "centred rho"),
                ("principal_cos_topk", f"mean top-{TOP_K} principal cosine"))


def interference(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(a) rho_{s,tau} (and the other overlaps) at theta_tau^0 against DeltaA(s<-tau)."""
  rows = []
  for seed, rec in sorted(sweep.base().items()):
    if "pairs" not in rec:
      continue
    acc = _acc(rec)
    for p in rec["pairs"]:
      s, t = p["s"], p["t"]
      rows.append({"seed": seed, "s": s, "tau": t, "lag": t - s,
                   **{c: p[c] for c, _ in A_PREDICTORS}, "drop": acc[t - 1, s] - acc[t, s]})
  if not rows:
    return _missing("a", "no record of the base arm with kernel pairs")
  df = pd.DataFrame(rows)
  seeds = [d for _, d in df.groupby("seed")]
  found = []
  for col, name in A_PREDICTORS:
    iv = _per_seed([(d[col].to_numpy(), d["drop"].to_numpy(), d["lag"].to_numpy()) for d in seeds],
                  evidence.partial_spearman)
    found.append(finding(f"partial Spearman({name}, DeltaA | lag), {len(df)} pairs", iv, ">0"))
  per_lag = []
  for lag in sorted(df["lag"].unique()):
    sub = [d[d["lag"] == lag] for d in seeds]
    iv = _per_seed([(d["rho"].to_numpy(), d["drop"].to_numpy()) for d in sub], evidence.spearman)
    m = sum(len(d) for d in sub)
    found.append(finding(f"Spearman(rho, DeltaA) at lag {lag}, {m} pairs", iv, ">0"))
    at = df[df["lag"] == lag]
    per_lag.append({"lag": int(lag), "pairs": m, "mean_rho": float(at["rho"].mean()),
                    "mean_drop": float(at["drop"].mean())})
  if plot_path:
    plots.interference(df, plot_path)
  return _result("a", found, found[0]["verdict"], {"pairs": df.to_dict("records"),
                                                   "per_lag": per_lag}, plot_path)


# (b) -------------------------------------------------------------------------------------------
def orthogonality(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(b) each dis_temp arm (official signed sum, fix_orth) against the zero-weight control."""
  base = sweep.base_flat()
  if not base:
    return _missing("b", "no base arm")
  sw0 = switches.from_flat(base)
  keys = {"method.dis_temp", "method.variant"} | {f"method.{s}" for s in switches.NAMES}
  arms = {}
  for arm, (by_seed, flat) in sweep.differing(keys).items():
    sw = switches.from_flat(flat)
    if sw == sw0:
      kind = "official"
    elif not sw0["fix_orth"] and sw == dict(sw0, fix_orth=True):
      kind = "fix_orth"
    else:
      continue
    arms[(kind, float(flat["method.dis_temp"]))] = (arm, by_seed)
  control = arms.get(("official", 0.0))
  others = sorted(k for k in arms if k[1] > 0)
  if control is None or not others:
    return _missing("b", "needs the zero-weight control (dis_temp=0) and at least one arm")
  ctl = control[1]
  metric = {"mean_rho": lambda r: _mean_rho(r), "mean_rho_centred": lambda r: _mean_rho(
      r, "rho_centred"), "forgetting": lambda r: r["results"]["forgetting"],
            "A_T": lambda r: r["results"]["last_accuracy"]}
  found, table, verdicts = [], [], {}
  for kind, w in others:
    arm, by_seed = arms[(kind, w)]
    val = {m: {s: fn(r) for s, r in by_seed.items()} for m, fn in metric.items()}
    ref = {m: {s: fn(r) for s, r in ctl.items()} for m, fn in metric.items()}
    d = {m: evidence.paired(val[m], ref[m]) for m in metric}
    label = f"{'signed sum (official)' if kind == 'official' else 'fix_orth'} at {w:g}"
    rows = [finding(f"{label}: Delta mean rho", d["mean_rho"], "<0", digits=4),
            finding(f"{label}: Delta forgetting", d["forgetting"], "<0"),
            finding(f"{label}: Delta A_T", d["A_T"]),
            finding(f"{label}: Delta mean centred rho", d["mean_rho_centred"], "<0", digits=4)]
    if kind == "official":
      rows += [finding(f"{label}: Delta mean rho (code: no effect)", d["mean_rho"], "=0",
                       RHO_MARGIN, digits=4),
               finding(f"{label}: Delta forgetting (code: no effect)", d["forgetting"], "=0",
                       ACC_MARGIN),
               finding(f"{label}: Delta A_T (code: no effect)", d["A_T"], "=0", ACC_MARGIN)]
    found += rows
    verdicts[(kind, w)] = (rows[0]["verdict"], rows[1]["verdict"],
                           rows[4]["verdict"] if kind == "official" else None)
    table.append({"arm": arm, "kind": kind, "dis_temp": w, "seeds": len(by_seed),
                  **{f"delta_{m}": d[m].estimate for m in metric}})
  if plot_path:
    plots.orthogonality(pd.DataFrame(table), found, plot_path)
  paper = [v[0] for k, v in verdicts.items() if k[0] == "fix_orth"] + \
          [v[1] for k, v in verdicts.items() if k[0] == "fix_orth"]
  head = "; ".join(f"{k[0]} {k[1]:g}: rho {v[0]}, forgetting {v[1]}" +
                   (f", no-effect {v[2]}" if v[2] else "") for k, v in sorted(verdicts.items()))
  return _result("b", found, _combine(paper) if paper else None, {"arms": table}, plot_path,
                 headline=head)


# (c) -------------------------------------------------------------------------------------------
def _per_class(rec) -> float:
  """Training images per class of a run (the config's cap, or the counted images)."""
  n = int(flat_config(rec["config"]).get("data.max_per_class_train") or 0)
  if n:
    return float(n)
  counts, tasks = rec.get("counts", {}).get("train"), rec.get("tasks_classes")
  return float(np.sum(counts) / sum(len(c) for c in tasks)) if counts and tasks else float("nan")


def views_and_sample_size(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(c) the stacked-view effective rank against the fused view's, and the gap against N."""
  found, tables = [], {}
  ratio, ratio_c, ranks = {}, {}, []
  for seed, rec in sorted(sweep.base().items()):
    per = (rec.get("views") or {}).get("per_task")
    if not per:
      continue
    ratio[seed] = float(np.mean([p["r_eff"]["stacked"] / p["r_eff"]["fused"] for p in per]))
    ratio_c[seed] = float(np.mean([p["r_eff_centred"]["stacked"] / p["r_eff_centred"]["fused"]
                                   for p in per]))
    for p in per:
      ranks.append({"seed": seed, "task": p["task"], **{f"r_eff_{k}": v for k, v in
                                                          p["r_eff"].items()},
                    **{f"r_eff_centred_{k}": v for k, v in p["r_eff_centred"].items()}})
  verdicts = []
  if ratio:
    f1 = finding("r_eff(stacked 3n) / r_eff(fused n) at theta_T", evidence.t_interval(list(ratio.values())),
                 ">0", threshold=VIEW_RATIO)
    f2 = finding("the same on centred kernels", evidence.t_interval(list(ratio_c.values())), ">0",
                 threshold=VIEW_RATIO)
    found += [f1, f2]
    verdicts.append(f1["verdict"])
    tables["effective_ranks_per_task"] = (pd.DataFrame(ranks).drop(columns="seed")
                                          .groupby("task").mean().reset_index()
                                          .to_dict("records"))  # means over seeds
  arms = sweep.differing({"data.max_per_class_train", "optim.epochs"})
  points = []
  for arm, (by_seed, _) in arms.items():
    for seed, rec in by_seed.items():
      if rec.get("gap"):
        gap = float(np.mean([g["train_acc"] - g["test_acc"] for g in rec["gap"]]))
        points.append({"arm": arm, "seed": seed, "n_per_class": _per_class(rec), "gap": gap})
  if len({p["n_per_class"] for p in points}) >= 2:
    df = pd.DataFrame(points)
    slopes = {s: metrics.loglog_slope(d["n_per_class"], d["gap"]) for s, d in df.groupby("seed")}
    ok = {s: v for s, v in slopes.items() if np.isfinite(v)}
    note = (f"seeds {sorted(set(slopes) - set(ok))} left out (fewer than 2 positive gaps)"
            if len(ok) < len(slopes) else "")
    f3 = finding("log-log slope of the gap against images per class", evidence.t_interval(list(ok.values())),
                 "<0", note=note)
    f4 = finding("the same slope against N^-1/2", evidence.t_interval(list(ok.values())), "=0",
                 SLOPE_MARGIN, threshold=SLOPE)
    found += [f3, f4]
    verdicts.append(f3["verdict"])
    tables["gap"] = df.to_dict("records")
    tables["slopes"] = [{"seed": s, "slope": v} for s, v in slopes.items()]
  if not found:
    return _missing("c", "no base record with views and no sample-size arms with gaps")
  if plot_path:
    plots.views_and_sample_size(pd.DataFrame(ranks) if ranks else None, ratio,
                                pd.DataFrame(points) if points else None, VIEW_RATIO, plot_path)
  head = "; ".join(f"{f['quantity']}: {f['verdict']}" for f in found if f["verdict"])
  return _result("c", found, found[0]["verdict"], tables, plot_path, headline=head)


# (d) -------------------------------------------------------------------------------------------
def laziness(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(d) e_lin and the linearised run's agreement over whole tasks."""
  rows = [{"seed": seed, **r} for seed, rec in sorted(sweep.base().items())
          for r in rec.get("lazy", [])]
  if not rows:
    return _missing("d", "no base record with the lazy-regime part")
  df = pd.DataFrame(rows)
  later = df[df["task"] >= 1] if (df["task"] >= 1).any() else df
  per_seed = later.groupby("seed").mean(numeric_only=True)
  e = finding("e_lin over a task (tasks 1..T-1)", evidence.t_interval(per_seed["e_lin"]), "<0",
              threshold=E_LIN_MAX, digits=3)
  a = finding("agreement of linearised and real predictions", evidence.t_interval(per_seed["agreement"]),
              ">0", threshold=AGREEMENT_MIN, digits=3)
  s = finding("S(K(theta_t^0), K(theta_t))", evidence.t_interval(per_seed["S"]), digits=4)
  acc = finding("accuracy real - linearised (points)",
                evidence.t_interval(100 * (per_seed["acc_real"] - per_seed["acc_lin"])))
  ef = finding("relative output error of the linearised run (e_fun)", evidence.t_interval(per_seed["e_fun"]),
               digits=3)
  task0 = df[df["task"] == 0]
  note = ""
  if len(task0):
    note = (f"task 0 (from the zero-initialised adapters): e_lin {task0['e_lin'].mean():.3g}, "
            f"agreement {task0['agreement'].mean():.2f}, S {task0['S'].mean():.3g}")
  if plot_path:
    plots.laziness(df, E_LIN_MAX, AGREEMENT_MIN, plot_path)
  by_task = df.groupby("task").mean(numeric_only=True).reset_index().drop(columns="seed")
  res = _result("d", [e, a, s, acc, ef], _combine([e["verdict"], a["verdict"]]),
                {"per_task": by_task.to_dict("records")}, plot_path)
  res["note"] = note
  return res


# (e) -------------------------------------------------------------------------------------------
def spectra_and_groups(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(e) centred spectra (fast decay), raw vs centred overlap, parameter-group trace shares."""
  base = {s: r for s, r in sorted(sweep.base().items()) if "tasks" in r}
  if not base:
    return _missing("e", "no base record with per-task spectra")
  per_seed = {}
  for seed, rec in base.items():
    t = rec["tasks"]
    per_seed[seed] = {
        "top3_centred": np.mean([x["at_t"]["top3_share_centred"] for x in t]),
        "top3_raw": np.mean([x["at_t"]["top3_share"] for x in t]),
        "r_eff": np.mean([x["at_t"]["effective_rank"] for x in t]),
        "r_eff_centred": np.mean([x["at_t"]["effective_rank_centred"] for x in t]),
        "rho": _mean_rho(rec), "rho_centred": _mean_rho(rec, "rho_centred"),
        "drift": np.mean([x["drift_S"] for x in t[:-1]]) if len(t) > 1 else np.nan,
        "drift_centred": np.mean([x["drift_S_centred"] for x in t[:-1]]) if len(t) > 1
                         else np.nan}
  col = lambda k: [v[k] for v in per_seed.values()]  # noqa: E731
  n = base[next(iter(base))]["n_per_task"]
  main = finding(f"top-{TOP_K} share of the centred {n}x{n} task kernel at theta_t",
                 evidence.t_interval(col("top3_centred")), ">0", threshold=TOP_SHARE_MIN)
  found = [main,
           finding(f"top-{TOP_K} share of the raw task kernel (for contrast: its shared "
                   f"component alone holds most of the trace)", evidence.t_interval(col("top3_raw")), ">0",
                   threshold=TOP_SHARE_MIN),
           finding("effective rank, raw", evidence.t_interval(col("r_eff"))),
           finding("effective rank, centred", evidence.t_interval(col("r_eff_centred"))),
           finding("mean rho over pairs at theta_tau^0, raw", evidence.t_interval(col("rho")), digits=3),
           finding("mean rho over pairs at theta_tau^0, centred", evidence.t_interval(col("rho_centred")),
                   digits=3),
           finding("old-task drift S(K_ss(theta_s), K_ss(theta_T)), raw", evidence.t_interval(col("drift")),
                   digits=4),
           finding("the same, centred", evidence.t_interval(col("drift_centred")), digits=4)]
  groups = []
  for seed, rec in base.items():
    g = rec.get("groups")
    if g:
      for name in g["shares"]:
        groups.append({"seed": seed, "group": name, "share": g["shares"][name],
                       "share_centred": g["shares_centred"][name]})
  gtab = []
  if groups:
    gd = pd.DataFrame(groups)
    for name, d in gd.groupby("group"):
      iv, ivc = evidence.t_interval(d["share"]), evidence.t_interval(d["share_centred"])
      gtab.append({"group": name, "share": iv.text(3, False), "share_centred":
                   ivc.text(3, False)})
  spectra = [{"seed": seed, "task": x["task"], "index": i, "eigenvalue": v, "kind": kind}
             for seed, rec in base.items() for x in rec["tasks"]
             for kind, key in (("raw", "spectrum"), ("centred", "spectrum_centred"))
             for i, v in enumerate(x["at_t"][key])]
  if plot_path:
    plots.spectra_and_groups(pd.DataFrame(spectra), pd.DataFrame(groups) if groups else None,
                             plot_path)
  return _result("e", found, main["verdict"], {"groups": gtab}, plot_path)


# (f) -------------------------------------------------------------------------------------------
def _old_drift(rec, col="drift_S") -> Optional[float]:
  t = rec.get("tasks", [])
  return float(np.mean([x[col] for x in t[:-1]])) if len(t) > 1 else None


def regularisation_and_ema(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(f) the reg_temp sweep (U shape, leave-one-seed-out choice of the interior value) and EMA
  against copying the last task's values into the frozen set."""
  found, tables, verdicts = [], {}, []
  base = sweep.base()
  copy = {arm: v for arm, v in sweep.differing({"method.frozen_update"}).items()
          if v[1].get("method.frozen_update") == "copy"}
  if copy and base:
    cp = next(iter(copy.values()))[0]
    dr = evidence.paired({s: _old_drift(r) for s, r in base.items()},
                 {s: _old_drift(r) for s, r in cp.items()})
    drc = evidence.paired({s: _old_drift(r, "drift_S_centred") for s, r in base.items()},
                  {s: _old_drift(r, "drift_S_centred") for s, r in cp.items()})
    da = evidence.paired({s: r["results"]["last_accuracy"] for s, r in base.items()},
                 {s: r["results"]["last_accuracy"] for s, r in cp.items()})
    dfg = evidence.paired({s: r["results"]["forgetting"] for s, r in base.items()},
                  {s: r["results"]["forgetting"] for s, r in cp.items()})
    f_drift = finding("EMA - copy: old-task kernel drift S", dr, "<0", digits=4)
    f_acc = finding("EMA - copy: A_T", da, ">0")
    found += [f_drift, finding("EMA - copy: old-task drift, centred", drc, "<0", digits=4),
              f_acc, finding("EMA - copy: forgetting", dfg, "<0")]
    verdicts += [("EMA drift", f_drift["verdict"]), ("EMA accuracy", f_acc["verdict"])]
  reg = sweep.differing({"method.reg_temp"})
  by_r = {float(flat["method.reg_temp"]): by_seed for by_seed, flat in reg.values()}
  if len(by_r) >= 3 and base:
    rs = sorted(by_r)
    seeds = sorted(set.intersection(*[set(by_r[r]) for r in rs]))
    acc = {r: {s: by_r[r][s]["results"]["last_accuracy"] for s in seeds} for r in rs}
    official = float(flat_config(next(iter(base.values()))["config"])["method.reg_temp"])
    interior = rs[1:-1]

    def pick(train_seeds):
      return max(interior, key=lambda r: np.mean([acc[r][s] for s in train_seeds]))
    chosen = {s: pick([u for u in seeds if u != s] or [s]) for s in seeds}
    d_lo = {s: acc[chosen[s]][s] - acc[rs[0]][s] for s in seeds}
    d_hi = {s: acc[chosen[s]][s] - acc[rs[-1]][s] for s in seeds}
    note = ("interior value chosen on the other seeds" if len(seeds) > 1 else
            "one seed: interior value chosen on the same seed")
    f_lo = finding(f"A_T(interior) - A_T(reg_temp={rs[0]:g})", evidence.t_interval(list(d_lo.values())), ">0",
                   note=note)
    f_hi = finding(f"A_T(interior) - A_T(reg_temp={rs[-1]:g})", evidence.t_interval(list(d_hi.values())), ">0",
                   note=note)
    found += [f_lo, f_hi]
    verdicts.append(("U shape", _combine([f_lo["verdict"], f_hi["verdict"]])))
    rows = []
    for r in rs:
      d = evidence.paired(acc[r], acc[official]) if official in acc else None
      rows.append({"reg_temp": r, "seeds": len(by_r[r]),
                   "A_T": evidence.t_interval(list(acc[r].values())).text(2, False),
                   "delta_A_T_vs_official": d.text(2) if d else None,
                   "forgetting": float(np.mean([x["results"]["forgetting"]
                                                for x in by_r[r].values()])),
                   "old_drift": float(np.nanmean([np.nan if _old_drift(x) is None else
                                                  _old_drift(x) for x in by_r[r].values()]))})
    tables["reg_temp"] = rows
    tables["chosen_interior"] = [{"seed": s, "reg_temp": r} for s, r in chosen.items()]
  if not found:
    return _missing("f", "needs the 'copy' arm or at least three reg_temp values")
  if plot_path:
    plots.regularisation_and_ema(tables.get("reg_temp"), by_r, found, plot_path)
  head = "; ".join(f"{k}: {v}" for k, v in verdicts)
  return _result("f", found, None, tables, plot_path, headline=head)


ANALYSES = {"a": interference, "b": orthogonality, "c": views_and_sample_size, "d": laziness,
            "e": spectra_and_groups, "f": regularisation_and_ema}


def analyse_sweep(sweep: Sweep, keys: str = "abcdef", plot_dir: Optional[str] = None,
                  prefix: str = "") -> dict:
  """{key: result} of the chosen experiments; plots to plot_dir/<prefix>theory_<key>.png."""
  out = {}
  for k in keys:
    path = os.path.join(plot_dir, f"{prefix}theory_{k}.png") if plot_dir else None
    out[k] = ANALYSES[k](sweep, path)
  return out


# -- one analysed run (ntk_analysis.analyse's report; descriptive, no verdict) -------------------
def results(workdir: str) -> dict:
  return _results(workdir)


def task_kernel(workdir: str, t: int) -> joint.JointKernel:
  """The fused-view joint kernel at the end of task t (theta_t = theta_{t+1}^0)."""
  path = joint.task_end_path(workdir, t)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} missing: compute the task-end kernels with `python -m "
                            f"ntk_analysis.analyse --workdir={workdir} --task_ends`")
  return joint.JointKernel.load(path)


def pair_row(jk: joint.JointKernel, s, t, top_k: int = TOP_K) -> dict:
  """Overlap of tasks s and t in one joint kernel: rho, the mean of the top-k principal cosines
  and the mean |tangent cosine| between their samples."""
  ang = metrics.principal_angles_blocks(jk.block(s, s), jk.block(t, t), jk.block(s, t))
  cos = metrics.tangent_cosines(jk.k)[np.ix_(jk.rows(s), jk.rows(t))]
  return {"rho": jk.alignment(s, t),
          "principal_cos_topk": float(ang[:top_k].mean()) if ang.size else 0.0,
          "tangent_cos_inter": float(np.abs(cos).mean())}


def overlap_vs_forgetting(workdirs: Sequence[str], plot_path: Optional[str] = None,
                          top_k: int = TOP_K, kernel: Optional[joint.JointKernel] = None) -> dict:
  """Per run and pair s < t: the overlap (pair_row) of the kernel at theta_t^0 (the end of task
  t-1; `kernel`: one kernel for every t instead) against the drop A[t-1, s] - A[t, s]. A
  description of one run: the verdict of (a) needs seeds and the lag control (`interference`)."""
  rows = []
  for wd in workdirs:
    acc = np.array([[np.nan if v is None else v for v in row]
                    for row in _results(wd)["accuracy_matrix"]], np.float64)
    for t in range(1, acc.shape[0]):
      jk = kernel if kernel is not None else task_kernel(wd, t - 1)
      for s in range(t):
        rows.append({"run": os.path.basename(os.path.normpath(wd)), "s": s, "t": t,
                     **pair_row(jk, s, t, top_k),
                     "accuracy_drop": float(acc[t - 1, s] - acc[t, s])})
  df = pd.DataFrame(rows)
  corr = {c: evidence.spearman(df[c], df["accuracy_drop"]) if len(df) > 2 else float("nan")
          for c in ("rho", "principal_cos_topk")}
  if plot_path and len(df):
    plots.overlap_vs_forgetting(df, corr, plot_path)
  where = ("" if kernel is None else
           f" (one kernel, checkpoint {kernel.meta.get('checkpoint')}: confounded with task age)")
  return {"experiment": "a", "prediction": PREDICTIONS["a"],
          "measured": f"Spearman(rho, drop) = {corr['rho']:.2f}, Spearman(principal cos, drop) "
                      f"= {corr['principal_cos_topk']:.2f} over {len(df)} task pairs of one "
                      f"run{where}; no verdict from one run (scripts/theory.py)",
          "holds": None, "table": df.to_dict("records"),
          "plot": os.path.basename(plot_path) if plot_path else None}


def view_ranks(kernels_by_view: Mapping[str, joint.JointKernel]) -> dict:
  """Mean intra-task effective rank and inter-task alignment per view of one checkpoint. The
  'all' view of ntk_analysis.analyse is the mean of the three views' n x n kernels, not the
  stacked 3n x 3n kernel the 'N -> 3N' reading is about (measure_run's 'views' part)."""
  rows = [{"view": v, "mean_intra_effective_rank": float(np.mean(
      [metrics.effective_rank(jk.block(t, t)) for t in jk.tasks])),
           "mean_inter_alignment": jk.mean_inter_alignment()}
          for v, jk in kernels_by_view.items()]
  r_eff = {r["view"]: r["mean_intra_effective_rank"] for r in rows}
  ratio = (r_eff["all"] / r_eff["fused"] if "all" in r_eff and r_eff.get("fused", 0) > 0
           else None)
  return {"table": rows, "r_eff": r_eff, "ratio_all_over_fused": ratio, "holds": None,
          "prediction": "descriptive: effective rank per view of one checkpoint"}
