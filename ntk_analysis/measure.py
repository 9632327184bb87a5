"""Measuring one finished run for the theory checks (docs/ntk_theory.md §4): its kernel and
accuracy quantities, read from its task-end checkpoints, as a small JSON-ready dict (the record
scripts/theory.py keeps before the checkpoints go). Every quantity is named in §2.2.

    rec = measure.measure_run(workdir, parts=("pairs", "gap"), n_per_task=16, probes=8)

Parts (each a key of the returned dict):
  pairs       per task pair s < tau at theta_tau^0 (the start of tau, its fresh proxy head drawn as
              training drew it): rho_{s,tau} raw and centred, the mean top-k principal cosine, and
              the interference term K_{s,tau} (K_{tau,tau} + lambda I)^-1 R_tau of the kernel-ridge
              picture, predicted for the fused features of X_s from task tau's cross-entropy
              residuals R_tau (one-hot targets minus the proxy head's softmax at theta_tau^0) through
              a mixed readout [feature sketch ; proxy logits of the views]; beside it the measured
              feature drift of X_s from theta_tau^0 to theta_tau
  tasks       per task t, kernels over every adapted parameter (the current lists, fusion and the
              frozen sets the EMA updates): raw and centred spectra of K_tt at theta_t, and each
              task's drift S(K_tt(theta_t), K_tt(theta_T))
  views       per task at theta_T: effective rank of the stacked 3n x 3n kernel of the three views
              (each view's block scaled to unit trace first, then centred) and of the fused view's
  gap         per task at its own end theta_tau: the trained proxy head's accuracy and
              cross-entropy on the task's training images and on its test images; and the
              prototype classifier's accuracy on the task's own classes, on the training images
              with leave-one-out prototypes (each image's own class mean without it) and on the test
              images (for every method, SimpleCIL included)
  lazy        per task t: the linearised run (ntk_analysis/linear_model.py) trained from
              theta_t^0 over the same minibatches, loss terms and dropout as the real run, against
              the real theta_t on held-out test images; e_lin of the real update; S(K(theta_t^0),
              K(theta_t))
  groups      at theta_T: each parameter group's share of the parameters and of the trace of the
              raw and of the centred kernel
  grad_scale  at theta_1^0 on the first minibatch of task 1: the gradient norm over the PEFT
              parameters of each loss term (cross-entropies, NCE, the official and the corrected
              orthogonality term), from which (b) states its predictions
  nt_check    the fused kernel at theta_T once more through neural-tangents, against the JAX
              backend's
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ntk_analysis import joint, kernels, linear_model, metrics, param_groups, readouts, run_data
from ntkcl_jax import data
from ntkcl_jax import losses
from ntkcl_jax import tree_utils
from ntkcl_jax.checkpoints import runs
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import peft

PARTS = ("pairs", "tasks", "views", "gap", "lazy", "groups", "grad_scale", "nt_check")
TOP_K = 3  # principal cosines averaged per pair
RIDGE = 0.1  # lambda of the interference term: this fraction of K_tau,tau's mean eigenvalue
SETTINGS = {"n_per_task": 16, "probes": 8, "lin_test": 64}


def rounded(x, digits: int = 6):
  """JSON-ready copy with floats to `digits` significant digits (records stay small)."""
  if isinstance(x, dict):
    return {str(k): rounded(v, digits) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [rounded(v, digits) for v in x]
  if isinstance(x, np.ndarray):
    return rounded(x.tolist(), digits)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None
  return x


class Run:
  """A finished run opened for measuring: its learner, stream, task-end states and the fixed
  probe images (n per task, drawn from the run's seed, so the arms of one seed share them)."""

  def __init__(self, workdir: str, n_per_task: int, num_probes: int):
    self.workdir = workdir
    ends = run_data.task_end_checkpoints(workdir)
    self.config, self.learner, _, _ = runs.load_run(workdir, ends[max(ends)])
    self.stream = data.build_stream(self.config)
    self.T = self.stream.num_tasks
    ends = run_data.require_task_ends(workdir, range(self.T))
    self.seed = int(self.config.seed)
    self.states = [runs.restore_state(workdir, self.learner, ends[t])[0] for t in range(self.T)]
    self.images, self.labels = run_data.task_data(self.stream)
    self.n = min([n_per_task] + [len(self.images[t]) for t in range(self.T)])
    idx = {t: joint.subset_indices(self.seed, t, len(self.images[t]), self.n)
           for t in range(self.T)}
    self.x = np.concatenate([self.images[t][idx[t]] for t in range(self.T)])
    self.y = np.concatenate([self.labels[t][idx[t]] for t in range(self.T)])
    self.rows = {t: np.arange(t * self.n, (t + 1) * self.n) for t in range(self.T)}
    self.probe = readouts.probes(self.learner.spec.feature_dim, num_probes, self.seed)
    self.trains = self.learner.epochs() > 0
    self.features = jitted_features(self.learner)

  def classes(self, t: int) -> list:
    return [int(c) for c in np.asarray(self.stream.tasks[t]).reshape(-1)]

  def start(self, t: int):
    """theta_t^0: the state training started task t from, its proxy head drawn as training drew
    it (the state's own rng)."""
    prev = self.states[t - 1] if t else self.learner.init_state(jax.random.PRNGKey(self.seed))
    return self.learner.start_task(prev)


# -- readouts ---------------------------------------------------------------------------------
def views_of(learner) -> tuple:
  """The features NTK-CL's loss puts through the proxy head (channel, patch, fused), or the one
  feature of the other methods."""
  return readouts.VIEWS if learner.spec.method == "ntkcl" else ("fused",)


def mixed_readout(learner, state, probe, n_new: int):
  """(f, params): f(x) = [fused feature sketch (R) ; proxy-head logits of each view (V n_new)],
  the readout whose untraced kernel gives both the feature rows and the logit columns of the
  interference term; the proxy head and the frozen sets are closed over."""
  f_all, params = readouts.model_readout(learner, state, "all",
                                         np.eye(learner.spec.feature_dim, dtype=np.float32))
  proxy, names = state["params"]["proxy"], views_of(learner)
  v = jnp.asarray(probe)
  pick = [readouts.VIEWS.index(n) for n in names]

  def f(p, x):
    z = f_all(p, x).reshape(x.shape[0], len(readouts.VIEWS), -1)
    logits = peft.cosine_logits(z[:, pick], proxy)[..., :n_new]
    return jnp.concatenate([z[:, 2] @ v, logits.reshape(x.shape[0], -1)], axis=-1)
  return f, params


def adapted_readout(learner, state, probe):
  """(f, params): the fused feature sketch over every adapted parameter, {'trainable': the
  current lists and fusion (inert fusion Q/K left out), 'frozen': the sets the EMA updates}."""
  spec, backbone = learner.spec, learner.backbone
  trainable = learner.trainable(state)
  inert = {k: trainable["fusion"][k] for k in readouts.inert_fusion_parameters(spec)}
  params = {"trainable": readouts.readout_params(learner, state),
            "frozen": learner.frozen(state)}
  v = jnp.asarray(probe)

  def f(p, x):
    cur = p["trainable"]
    if inert:
      cur = dict(cur, fusion=dict(cur["fusion"], **inert))
    return ntkcl.features(spec, backbone, cur, p["frozen"], x, train=False)["fused"] @ v
  return f, params


# -- parts ------------------------------------------------------------------------------------
def _overlap(k, rows_s, rows_t) -> dict:
  """rho raw and centred and the mean top-k principal cosine of two tasks' rows of a traced
  joint kernel."""
  kc = metrics.centre(k)
  out = {}
  for tag, m in (("", k), ("_centred", kc)):
    b = lambda r, c: m[np.ix_(r, c)]  # noqa: E731
    ang = metrics.principal_angles_blocks(b(rows_s, rows_s), b(rows_t, rows_t), b(rows_s, rows_t))
    out["rho" + tag] = metrics.alignment(b(rows_s, rows_s), b(rows_t, rows_t), b(rows_s, rows_t))
    out["principal_cos_topk" + tag] = float(ang[:TOP_K].mean()) if ang.size else 0.0
  return out


def interference(k_mixed, rows_s, rows_t, r: int, residual: np.ndarray) -> float:
  """||K_{s,tau}^{feat,logit} (K_{tau,tau}^{logit} + lambda I)^-1 R_tau||^2 / n_s: the predicted
  change of X_s's feature sketch from task tau's residuals (docs/ntk_theory.md §2.2), with lambda
  = RIDGE x the mean eigenvalue of the logit block."""
  fl = _cross(k_mixed[np.ix_(rows_s, rows_t)][:, :, :r, r:])
  ll = _cross(k_mixed[np.ix_(rows_t, rows_t)][:, :, r:, r:])
  lam = RIDGE * np.trace(ll) / ll.shape[0]
  d = fl @ np.linalg.solve(ll + lam * np.eye(ll.shape[0]), residual.reshape(-1))
  return float(np.sum(d * d) / len(rows_s))


def _cross(k) -> np.ndarray:
  """(n_s, n_t, R, O) block of an untraced kernel -> the (n_s R) x (n_t O) matrix, rows
  (sample, output)."""
  ns, nt, r, o = k.shape
  return np.asarray(k, np.float64).transpose(0, 2, 1, 3).reshape(ns * r, nt * o)


def _ce_residual(logits: np.ndarray, labels: np.ndarray, n_new: int) -> np.ndarray:
  """One-hot targets minus the softmax of each view's logits, (n, V n_new): the negative
  gradient of the cross-entropy with respect to the logits (the first step's residual)."""
  z = logits.reshape(len(labels), -1, n_new)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(n_new)[labels][:, None, :]
  return (onehot - p).reshape(len(labels), -1)


def part_pairs(run: Run, kw: dict, log: Callable) -> list:
  """Overlap, interference term and measured feature drift of every pair s < tau."""
  rows, r, out = run.rows, run.probe.shape[1], []
  for tau in range(1, run.T):
    s0 = run.start(tau)
    classes = run.classes(tau)
    f, params = mixed_readout(run.learner, s0, run.probe, len(classes))
    k = np.asarray(kernels.ntk_fn(f, trace=False, **kw)(params, run.x))  # (N, N, O, O)
    sketch = np.mean([k[:, :, i, i] for i in range(r)], axis=0)
    out_0 = np.asarray(jax.jit(f)(params, run.x), np.float64)
    local = np.searchsorted(classes, run.y[rows[tau]])
    residual = _ce_residual(out_0[rows[tau], r:], local, len(classes))
    f_end, p_end = readouts.model_readout(run.learner, run.states[tau], "fused", run.probe)
    moved = np.asarray(jax.jit(f_end)(p_end, run.x), np.float64) - out_0[:, :r]
    for s in range(tau):
      out.append({"s": s, "t": tau, **_overlap(sketch, rows[s], rows[tau]),
                  "interference": interference(k, rows[s], rows[tau], r, residual),
                  "feature_drift": float(np.sum(moved[rows[s]] ** 2) / len(rows[s]))})
    log(f"  pairs at the start of task {tau}")
  return out


def _spectrum(k) -> dict:
  w, wc = metrics.spectrum(k), metrics.spectrum(metrics.centre(k))
  return {"trace": float(np.trace(k)), "top3_share": metrics.top_share(k, TOP_K),
          "top3_share_centred": metrics.top_share(metrics.centre(k), TOP_K),
          "effective_rank": metrics.effective_rank(k),
          "effective_rank_centred": metrics.effective_rank(metrics.centre(k)),
          "spectrum": (w / w.sum()).tolist() if w.sum() > 0 else [],
          "spectrum_centred": (wc / wc.sum()).tolist() if wc.sum() > 0 else []}


def part_tasks(run: Run, kw: dict, log: Callable) -> list:
  """Spectra of each task's block at its own end and its drift to theta_T, over every adapted
  parameter (frozen sets included: the EMA moves them)."""
  ks = []
  for t in range(run.T):
    f, params = adapted_readout(run.learner, run.states[t], run.probe)
    ks.append(np.asarray(kernels.ntk_fn(f, **kw)(params, run.x)))
    log(f"  adapted-parameter kernel at the end of task {t}")
  out = []
  for t in range(run.T):
    own = ks[t][np.ix_(run.rows[t], run.rows[t])]
    fin = ks[-1][np.ix_(run.rows[t], run.rows[t])]
    out.append({"task": t, "at_t": _spectrum(own), "drift_S": metrics.kernel_distance(own, fin),
                "drift_S_centred": metrics.kernel_distance(metrics.centre(own),
                                                           metrics.centre(fin))})
  return out


def trace_normalised_stack(blk) -> np.ndarray:
  """(n, n, V, V) multi-view block -> the Vn x Vn matrix with each view scaled to unit trace
  (K_vw / sqrt(tr K_vv tr K_ww)), so no view outweighs another by its scale."""
  tr = np.array([np.trace(blk[:, :, v, v]) for v in range(blk.shape[2])])
  scale = np.sqrt(np.outer(tr, tr))
  return kernels.multiview_matrix(blk / np.where(scale > 0, scale, 1.0)[None, None])


def centred_views(blk) -> np.ndarray:
  """(n, n, V, V) multi-view block with every view's tangent features centred over the samples
  (J_v(x) - mean_x J_v(x)): each (v, w) block becomes H K_vw H. Centring the stacked Vn x Vn
  matrix as one would leave each view's own mean behind, a rank V - 1 component that can
  dominate its spectrum."""
  k = np.asarray(blk, np.float64)
  return (k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True)
          + k.mean((0, 1), keepdims=True))


def part_views(run: Run, kw: dict, log: Callable) -> list:
  """Effective ranks of the stacked three-view kernel and of the fused view, per task at
  theta_T, both centred (the stacked one view by view, then each view at unit trace)."""
  if run.learner.spec.method != "ntkcl":
    return []
  f_all, params = readouts.model_readout(run.learner, run.states[-1], "all", run.probe)
  f = lambda q, xx: f_all(q, xx).reshape(xx.shape[0], 3, -1)  # noqa: E731
  k = np.asarray(kernels.ntk_fn(f, **kw)(params, run.x))  # (N, N, 3, 3) over VIEWS
  out = [{"task": t, **view_ranks(k[np.ix_(run.rows[t], run.rows[t])])} for t in range(run.T)]
  log("  three-view kernel at the last task's end")
  return out


def view_ranks(blk) -> dict:
  """Centred effective ranks of one task's (n, n, 3, 3) three-view block: the stacked 3n x 3n
  kernel (each view centred, then at unit trace), the fused view alone and each view alone."""
  blk = np.asarray(blk, np.float64)
  views = {v: metrics.effective_rank(metrics.centre(blk[:, :, i, i]))
           for i, v in enumerate(readouts.VIEWS)}
  return {"r_eff_fused": views["fused"],
          "r_eff_stacked": metrics.effective_rank(trace_normalised_stack(centred_views(blk))),
          "r_eff_views": views}


def jitted_features(learner) -> Callable:
  """features(state, x) -> fused features (eval mode) of model inputs x, float64, under
  `learner`'s model (the linearised one for a linearised run); one compile per learner."""
  fn = jax.jit(lambda tr, fr, xb: learner.features(learner.backbone, tr, fr, xb)["fused"])

  def features(state, x: np.ndarray, batch: int = 64) -> np.ndarray:
    tr, fr = learner.trainable(state), learner.frozen(state)
    return np.concatenate([np.asarray(fn(tr, fr, x[i:i + batch]), np.float64)
                           for i in range(0, len(x), batch)])
  return features


def reweighted(x: np.ndarray, protos: np.ndarray, weights) -> np.ndarray:
  """sum_s w_s cos(x^(s), p^(s)) for every pair (x_i, p_c): the test-time logits (docs/method.md
  §4.1) in float64, (n, C)."""
  s = len(weights)
  xs = x.reshape(len(x), s, -1)
  ps = protos.reshape(len(protos), s, -1)
  xs = xs / np.maximum(np.linalg.norm(xs, axis=-1, keepdims=True), 1e-12)
  ps = ps / np.maximum(np.linalg.norm(ps, axis=-1, keepdims=True), 1e-12)
  return np.einsum("nsd,csd,s->nc", xs, ps, np.asarray(weights, np.float64))


def loo_ncm_accuracy(train: np.ndarray, y_train: np.ndarray, weights) -> float:
  """Prototype-classifier accuracy on its own training images with leave-one-out prototypes:
  each image is classified against its own class mean computed without it (no image votes for
  itself), every other class's full mean."""
  classes = np.unique(y_train)
  sums = np.stack([train[y_train == c].sum(0) for c in classes])
  counts = np.array([np.sum(y_train == c) for c in classes], np.float64)
  logits = reweighted(train, sums / counts[:, None], weights)
  own = np.searchsorted(classes, y_train)
  loo = (sums[own] - train) / np.maximum(counts[own] - 1, 1)[:, None]
  xs = train.reshape(len(train), len(weights), -1)
  ls = loo.reshape(len(loo), len(weights), -1)
  cos = np.sum(xs * ls, -1) / np.maximum(np.linalg.norm(xs, axis=-1) *
                                         np.linalg.norm(ls, axis=-1), 1e-12)
  logits[np.arange(len(train)), own] = cos @ np.asarray(weights, np.float64)
  return float(np.mean(classes[logits.argmax(1)] == y_train))


def part_gap(run: Run, kw: dict, log: Callable) -> list:
  """Each task's gap at its own end: the trained proxy head (train vs test accuracy and
  cross-entropy; methods that train), and the prototype classifier on the task's own classes
  (leave-one-out training accuracy vs test accuracy; every method)."""
  del kw
  weights = run.learner.spec.section_weights
  out = []
  for t in range(run.T):
    classes, state = run.classes(t), run.states[t]
    row = {"task": t}
    feats = {}
    for split in ("proto", "test"):
      x, y = run_data.split_images(run.stream, split, classes)
      feats[split] = (run.features(state, x), np.searchsorted(classes, y))
    (ftr, ytr), (fte, yte) = feats["proto"], feats["test"]
    protos = np.stack([ftr[ytr == c].mean(0) for c in range(len(classes))])
    row["ncm_train_loo"] = loo_ncm_accuracy(ftr, ytr, weights)
    row["ncm_test"] = float(np.mean(reweighted(fte, protos, weights).argmax(1) == yte))
    if run.trains:
      head = jax.tree_util.tree_map(np.asarray, state["params"]["proxy"])
      for split, (f, y) in (("train", (ftr, ytr)), ("test", (fte, yte))):
        z = np.asarray(peft.cosine_logits(jnp.asarray(f, jnp.float32), head),
                       np.float64)[:, :len(classes)]
        lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
        row[f"proxy_{split}_acc"] = float(np.mean(z.argmax(1) == y))
        row[f"proxy_{split}_ce"] = float(np.mean(lse - z[np.arange(len(y)), y]))
    out.append(row)
  log("  gaps at each task's end")
  return out


def _task_test(run: Run, t: int, n: int):
  x, y = run_data.split_images(run.stream, "test", run.classes(t))
  idx = joint.subset_indices(run.seed, 1000 + t, len(x), min(n, len(x)))
  return x[idx], np.searchsorted(run.classes(t), y[idx])


def linearised_task(run: Run, t: int, lin: linear_model.LinearisedLearner):
  """(theta_t^0, the linearised run's final state): `lin` (one per run: the anchor travels in the
  state) linearised at theta_t^0 and trained over task t's real minibatches (same augmentation,
  order, loss terms, dropout keys and learning rates)."""
  s0 = run.start(t)
  state = lin.anchored(jax.tree_util.tree_map(jnp.copy, s0))  # the step donates its input
  bsz, classes = run.config.optim.batch_size, run.stream.tasks[t]
  for e in range(run.learner.epochs()):
    for batch in run.stream.train_batches(t, e, bsz):
      state, _ = lin.train_step(state, batch, e, classes)
  if int(jax.device_get(state["nonfinite_step"])):
    raise FloatingPointError(f"the linearised run of task {t} hit a non-finite loss")
  return s0, state


def part_lazy(run: Run, kw: dict, log: Callable, lin_test: int) -> list:
  """Per task: the linearised run against the real one on held-out test images (proxy head,
  fused view), e_lin of the real update and S(K(theta_t^0), K(theta_t))."""
  if not run.trains:
    return []
  lin = linear_model.LinearisedLearner(run.config, run.learner.backbone, run.learner.mesh)
  lin_features = jitted_features(lin)
  out = []
  for t in range(run.T):
    s0, s_lin = linearised_task(run, t, lin)
    s_real = dict(s0, params=run.states[t]["params"])  # theta_t with the frozen sets it used
    x, y = _task_test(run, t, lin_test)
    n_new = len(run.classes(t))
    logits = {}
    for name, st, features in (("start", s0, run.features), ("real", s_real, run.features),
                               ("lin", s_lin, lin_features)):
      f = features(st, x)
      logits[name] = np.asarray(peft.cosine_logits(jnp.asarray(f, jnp.float32),
                                                   st["params"]["proxy"]), np.float64)[:, :n_new]
      logits[name + "_feat"] = f
    moved = np.linalg.norm(logits["real_feat"] - logits["start_feat"])
    f0, p0 = readouts.model_readout(run.learner, s0, "fused", run.probe)
    _, p1 = readouts.model_readout(run.learner, s_real, "fused", run.probe)
    fn = kernels.ntk_fn(f0, **kw)
    k0, k1 = np.asarray(fn(p0, run.x)), np.asarray(fn(p1, run.x))
    out.append({
        "task": t, "acc_real": float(np.mean(logits["real"].argmax(1) == y)),
        "acc_lin": float(np.mean(logits["lin"].argmax(1) == y)),
        "agreement": float(np.mean(logits["real"].argmax(1) == logits["lin"].argmax(1))),
        "e_fun": float(np.linalg.norm(logits["lin_feat"] - logits["real_feat"]) / moved)
                 if moved > 0 else 0.0,
        "e_lin": metrics.linearisation_error(jax.jit(f0), p0, p1, run.x),
        "S": metrics.kernel_distance(k0, k1),
        "S_centred": metrics.kernel_distance(metrics.centre(k0), metrics.centre(k1))})
    log(f"  linearised run of task {t}: agreement {out[-1]['agreement']:.2f}, "
        f"e_fun {out[-1]['e_fun']:.3g}")
  return out


def part_groups(run: Run, kw: dict, log: Callable) -> dict:
  """Each parameter group's share of the parameters and of the raw and centred trace at
  theta_T."""
  del kw
  f, params = readouts.model_readout(run.learner, run.states[-1], "fused", run.probe)
  traces = param_groups.group_traces(f, params, run.x, param_groups.NTKCL_GROUPS)
  labels = param_groups.label_paths(params, param_groups.NTKCL_GROUPS)
  flat = tree_utils.flatten(params, sep="/")
  sizes: dict = {}
  for path, g in labels.items():
    sizes[g] = sizes.get(g, 0) + int(np.size(flat[path]))
  tot = sum(v["trace"] for v in traces.values())
  tot_c = sum(v["centred"] for v in traces.values())
  n_par = sum(sizes.values())
  log("  group trace shares at the last task's end")
  return {g: {"params": sizes[g], "param_share": sizes[g] / n_par,
              "trace_share": v["trace"] / tot, "centred_share": v["centred"] / tot_c}
          for g, v in traces.items()}


def part_grad_scale(run: Run, kw: dict, log: Callable) -> dict:
  """Gradient norms over the PEFT parameters of each loss term at theta_1^0 on task 1's first
  minibatch (the first task with old prototypes): the scale of each term against the
  cross-entropies', from which (b) predicts an effect or none."""
  del kw
  if run.T < 2 or run.learner.spec.method != "ntkcl":
    return {}
  lrn, state = run.learner, run.start(1)
  batch = next(iter(run.stream.train_batches(1, 0, run.config.optim.batch_size)))
  batch = dict(lrn.device_batch(batch))
  batch["image"] = lrn.model_input(batch["image"])
  lo, n_new = jnp.int32(run.classes(1)[0]), jnp.int32(len(run.classes(1)))
  key_rows, key_drop = jax.random.split(jax.random.PRNGKey(run.seed), 2)
  rows = lrn.nce_rows(key_rows, lo, n_new)
  k = state["orth_basis"].shape[1]
  bases = {"official": losses.orth_basis(state["prototypes"], k, corrected=False),
           "corrected": losses.orth_basis(state["prototypes"], k, corrected=True)}

  def term(name, params):
    if name.startswith("orth_"):
      tr = {n: v for n, v in params.items() if n != "proxy"}
      f = lrn.features(lrn.backbone, tr, state["frozen"], batch["image"], train=True,
                       rng=key_drop)
      fn = losses.orth_official if name == "orth_official" else losses.orth_corrected
      return fn(f["channel"], f["patch"], bases[name[5:]], batch["mask"])
    _, (terms, _) = lrn._loss(params, state, lrn.backbone, batch, key_drop, rows, lo, n_new)  # pylint: disable=protected-access
    return (terms["ce_channel"] + terms["ce_patch"] + terms["ce_fused"] if name == "ce"
            else terms[name])
  out = {}
  for name in ("ce", "nce", "orth_official", "orth_corrected"):
    g = jax.jit(jax.grad(lambda p, name=name: term(name, p)))(state["params"])
    g = {n: v for n, v in g.items() if n != "proxy"}
    out[name] = float(np.sqrt(sum(float(jnp.sum(jnp.square(v)))
                                  for v in jax.tree_util.tree_leaves(g))))
  log("  gradient scale of each loss term at the start of task 1")
  return out


def part_nt_check(run: Run, kw: dict, log: Callable, reference=None) -> dict:
  """The fused kernel at theta_T through neural-tangents against the JAX backend's."""
  f, params = readouts.model_readout(run.learner, run.states[-1], "fused", run.probe)
  ref = reference if reference is not None else np.asarray(kernels.ntk_fn(f, **kw)(params, run.x))
  t = time.time()
  k = kernels.ntk_fn(f, backend="neural_tangents", implementation=1)(params, run.x)
  err = metrics.kernel_agreement(k, ref)
  log(f"  neural-tangents cross-check: max relative error {err['max_rel']:.2g}")
  return {"at": "theta_T", "implementation": 1, "n": int(k.shape[0]),
          "max_rel_error": err["max_rel"], "frob_rel_error": err["fro_rel"],
          "seconds": time.time() - t}


def measure_run(workdir: str, parts: Sequence[str] = PARTS, *, n_per_task: int = 16,
                probes: int = 8, lin_test: int = 64, log: Callable[[str], None] = print,
                **ntk_kwargs) -> dict:
  """The chosen parts (module docstring) of one finished run whose task-end checkpoints are all
  kept; `ntk_kwargs` configure kernels.ntk_fn (chunk, memory_limit, devices, ...)."""
  bad = sorted(set(parts) - set(PARTS))
  if bad:
    raise ValueError(f"unknown parts {bad}; choose from {PARTS}")
  t0 = time.time()
  run = Run(workdir, n_per_task, probes)
  out: dict = {"parts": list(parts), "n_per_task": run.n, "probes": probes,
               "counts": run.stream.counts,
               "tasks_classes": [run.classes(t) for t in range(run.T)],
               "steps_per_task": [run.learner.epochs() * run.stream.num_train_batches(
                   t, run.config.optim.batch_size) for t in range(run.T)]}
  fns = {"pairs": part_pairs, "tasks": part_tasks, "views": part_views, "gap": part_gap,
         "groups": part_groups, "grad_scale": part_grad_scale, "nt_check": part_nt_check,
         "lazy": lambda r, kw, lg: part_lazy(r, kw, lg, lin_test)}
  for part in PARTS:
    if part in parts:
      out[part] = fns[part](run, ntk_kwargs, log)
      log(f"  {part}: {time.time() - t0:.0f} s")
  out["measure_seconds"] = time.time() - t0
  return rounded(out)
