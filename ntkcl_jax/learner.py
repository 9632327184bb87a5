"""NTK-CL as pure jitted pieces over one state pytree (docs/method.md §0, 3, 4): init the state,
start a task, train step, end a task (EMA + prototypes), evaluate. The launcher (train.py) runs
them in the task / epoch / batch loop.

Everything that carries between steps lives in the state, and every leaf has a fixed shape for
the whole run, so a run restored from any checkpoint goes on bit-identically.

State layout:
  params      {'channel', 'patch', 'fusion' (present branches, see models/ntkcl.py), 'proxy'}
  frozen      the pre_ lists, stacked (F, ...)        reg_ref     L2 targets (docs/method.md §2.5)
  prototypes  (C, Dt) class means of the fused feature (fc.weight); rows of unseen classes are 0
  orth_basis  (Dt, k) B of docs/method.md §2.4, computed once per task from the prototypes
  opt, rng, acc (T, T), loss_sums {term: sum over the task's steps}, loss_count
  step        train steps applied so far (int32)
  log_sums    {term or 'accuracy': sum over the steps since the launcher last read them}, log_count
  nonfinite_step, nonfinite_loss   0 and 0, or the step whose loss or gradients were not finite
              and that loss: that step and every later one leave the state as it was (the
              launcher reads the flag at its log points, checkpoint saves and task ends)
The trainable PEFT tree for the NTK analysis is `Learner.trainable(state)` (= params minus proxy).

Images arrive as the stream's uint8 (or float in [0, 1]) and become the model's normalised input
inside the jitted functions (`normalization.model_input`); `step_given` takes that input as is.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcl_jax import losses
from ntkcl_jax import normalization
from ntkcl_jax import sharding
from ntkcl_jax.data import protocol
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import peft

LOSS_TERMS = ("loss", "ce_channel", "ce_patch", "ce_fused", "nce", "orth", "reg")
LOG_TERMS = LOSS_TERMS + ("accuracy",)  # what the launcher logs: means since its last read


def old_pool_size(lo, n_new, increment: int, fixed: bool):
  """How many prototypes the NCE term samples from (docs/method.md §2.3, 9 item 7). Official:
  `fc.weight[:-increment]`, i.e. seen classes minus `increment`; at task 0 with
  init_cls > increment that is init_cls - increment current-task (zero) rows. Fixed: the classes
  of earlier tasks, `lo`."""
  if fixed:
    return lo
  return jnp.maximum(lo + n_new - increment, 0)


def cosine_lr(lr0: float, epoch: int, epochs: int) -> float:
  """CosineAnnealingLR(T_max=E, eta_min=0) stepped per epoch (docs/method.md §3.1)."""
  return lr0 * (1 + math.cos(math.pi * epoch / epochs)) / 2


def sgd_torch(weight_decay: float, momentum: float) -> optax.GradientTransformation:
  """torch.optim.SGD with coupled weight decay; lr applied outside (updates * lr) (docs/method.md §3.1)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(1.0, momentum=momentum))


class Learner:
  """NTK-CL (and the channel / patch / simplecil / seq_adapter baselines) as jitted pieces."""

  def __init__(self, config, backbone_params, mesh):
    self.config, self.mesh = config, mesh
    self.spec = ntkcl.spec_from_config(config)
    self.switches = self.spec.switches
    self.vcfg = self.spec.vit
    d = config.data
    self.c, self.t = d.num_classes, protocol.num_tasks(config)
    self.n_max = max(d.init_cls, d.increment)
    self.method = config.method.name
    if config.method.frozen_update not in ("ema", "copy"):
      raise ValueError(f"method.frozen_update={config.method.frozen_update!r}: use 'ema' "
                       "(docs/method.md §3.4) or 'copy' (the last task's values)")
    self.backbone = sharding.put_replicated(backbone_params, mesh)
    self.tx = sgd_torch(config.optim.weight_decay, config.optim.momentum)
    rep, bat = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    self._init = jax.jit(self._init_state, out_shardings=rep)
    self._new_task = jax.jit(self._new_task_fn, in_shardings=(rep,), out_shardings=rep)
    self._rep = rep
    # The state is donated: its buffers are reused for the next state (the launcher keeps none).
    self._step = jax.jit(self._train_step, in_shardings=(rep, rep, bat, rep, rep, rep, rep),
                         out_shardings=(rep, rep), donate_argnums=(0,))
    self._scalars: dict = {}
    self.step_given = jax.jit(self._step_given, out_shardings=(rep, rep, rep))
    self._ema = jax.jit(self._ema_fn, in_shardings=(rep, rep), out_shardings=rep)
    self._proto_sums = jax.jit(self._proto_sums_fn, in_shardings=(rep, rep, bat),
                               out_shardings=(rep, rep))
    self._add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b), out_shardings=rep)
    self._set_protos = jax.jit(self._set_protos_fn, out_shardings=rep)
    self._eval = jax.jit(self._eval_fn, in_shardings=(rep, rep, bat, rep), out_shardings=rep)
    self._finish = jax.jit(self._finish_fn, out_shardings=rep)

  # -- state ---------------------------------------------------------------------------------
  def init_state(self, key):
    return self._init(key)

  def _init_state(self, key):
    k = jax.random.split(key, 4)
    trainable = ntkcl.init_trainable(self.spec, k[0])
    params = dict(trainable, proxy=peft.init_cosine(k[2], self.n_max, self.spec.feature_dim))
    kb = min(self.config.method.orth_k, self.spec.feature_dim)
    return {"params": params, "frozen": ntkcl.init_frozen(self.spec, k[1]),
            "reg_ref": jax.tree_util.tree_map(jnp.copy, trainable),
            "prototypes": jnp.zeros((self.c, self.spec.feature_dim)),
            "orth_basis": jnp.zeros((self.spec.feature_dim, kb)),
            "opt": self.tx.init(params), "rng": k[3],
            "acc": jnp.full((self.t, self.t), jnp.nan, jnp.float32),
            "loss_sums": {t: jnp.zeros(()) for t in LOSS_TERMS}, "loss_count": jnp.zeros(()),
            "step": jnp.zeros((), jnp.int32),
            "log_sums": {t: jnp.zeros(()) for t in LOG_TERMS}, "log_count": jnp.zeros(()),
            "nonfinite_step": jnp.zeros((), jnp.int32), "nonfinite_loss": jnp.zeros(())}

  @staticmethod
  def trainable(state) -> dict:
    """The PEFT tree the NTK analysis differentiates (current lists + fusion, no proxy head)."""
    return {k: v for k, v in state["params"].items() if k != "proxy"}

  @staticmethod
  def frozen(state) -> dict:
    return state["frozen"]

  def _new_task_fn(self, state):
    """Task start (docs/method.md §3.3 step 1): fresh proxy head + optimiser, B from the prototypes."""
    rng, key = jax.random.split(state["rng"])
    params = dict(state["params"], proxy=peft.init_cosine(key, self.n_max, self.spec.feature_dim))
    basis = losses.orth_basis(state["prototypes"], state["orth_basis"].shape[1],
                              corrected=self.switches.fix_orth)
    return dict(state, params=params, opt=self.tx.init(params), rng=rng, orth_basis=basis,
                loss_sums={t: jnp.zeros(()) for t in LOSS_TERMS}, loss_count=jnp.zeros(()))

  # -- training --------------------------------------------------------------------------------
  def nce_rows(self, key, lo, n_new):
    """The old-class prototype rows the NCE term draws this step, (indices (K,), valid (K,)):
    the official `randperm(pool)[:batch_size]` with K = optim.batch_size, padded past the pool."""
    kk = self.config.optim.batch_size
    n_old = old_pool_size(lo, n_new, self.config.data.increment, self.switches.fix_old_pool)
    old = jnp.arange(self.c) < n_old
    order = jnp.argsort(jnp.where(old, jax.random.uniform(key, (self.c,)), 2.0))
    j = order[:kk] if kk <= self.c else jnp.pad(order, (0, kk - self.c))
    return j, jnp.arange(kk) < jnp.minimum(kk, n_old)

  def _loss(self, params, state, backbone, batch, key, rows, lo, n_new):
    """The per-batch loss and its terms (eq. of the total loss: three CEs + NCE + orth + L2)."""
    m = self.config.method
    mask, labels = batch["mask"], batch["label"]
    local = jnp.clip(labels - lo, 0, self.n_max - 1)
    trainable = {k: v for k, v in params.items() if k != "proxy"}
    f = self.features(backbone, trainable, state["frozen"], batch["image"], train=True, rng=key)
    col = jnp.arange(self.n_max) < n_new

    def ce(x):
      logits = jnp.where(col, peft.cosine_logits(x, params["proxy"]), -1e9)
      return losses.cross_entropy(logits, local, mask), logits
    zero = jnp.zeros(())
    terms = dict.fromkeys(LOSS_TERMS[1:], zero)
    if self.method == "ntkcl":
      terms["ce_channel"], _ = ce(f["channel"])
      terms["ce_patch"], _ = ce(f["patch"])
      terms["ce_fused"], logits = ce(f["fused"])
      # NCE over [fused ; sampled old prototypes] (docs/method.md §2.3)
      j, jvalid = rows
      z = jnp.concatenate([f["fused"], jax.lax.stop_gradient(state["prototypes"][j])])
      nce_val, _ = losses.nce(z, jnp.concatenate([labels, j.astype(labels.dtype)]),
                              jnp.concatenate([mask, jvalid]), m.nce_tau)
      terms["nce"] = losses.finite_or_zero(nce_val if self.switches.fix_nce_sign else -nce_val)
      orth = losses.orth_corrected if self.switches.fix_orth else losses.orth_official
      terms["orth"] = losses.finite_or_zero(orth(f["channel"], f["patch"], state["orth_basis"],
                                                 mask))
      terms["reg"] = losses.finite_or_zero(losses.l2_reg(trainable, state["reg_ref"],
                                                         all_params=self.switches.fix_l2_all))
      total = (terms["ce_channel"] + terms["ce_patch"] + terms["ce_fused"] +
               m.nce_temp * terms["nce"] + m.dis_temp * terms["orth"] +
               m.reg_temp * terms["reg"])
    else:  # channel / patch / seq_adapter: own CE only (official model_name modes)
      key = "ce_patch" if self.method == "patch" else "ce_channel"
      terms[key], logits = ce(f["fused"])
      total = terms[key]
    acc = ((logits.argmax(-1) == local) & mask).sum() / jnp.maximum(mask.sum(), 1) * 100
    terms["loss"] = total
    return total, (terms, acc)

  def _train_step(self, state, backbone, batch, lr, lo, n_new, log_now):
    """The launcher's step: (state, means of LOG_TERMS since the last read). The update is kept
    only if the loss and gradients are finite and no earlier step was not; otherwise the state
    stays as it was, with `nonfinite_step` / `nonfinite_loss` set by the first such step.
    `log_now`: the launcher reads the means of this step, so the window restarts after it."""
    rng, k_drop, k_perm = jax.random.split(state["rng"], 3)
    batch = dict(batch, image=self.model_input(batch["image"]))
    new, loss, metrics, finite = self._update(dict(state, rng=rng), backbone, batch, lr, lo,
                                              n_new, self.nce_rows(k_perm, lo, n_new), k_drop)
    sums = {k: state["log_sums"][k] + metrics[k] for k in LOG_TERMS}
    count = state["log_count"] + 1
    means = {k: v / count for k, v in sums.items()}
    new = dict(new, step=state["step"] + 1,
               log_sums={k: jnp.where(log_now, 0.0, v) for k, v in sums.items()},
               log_count=jnp.where(log_now, 0.0, count))
    clean = state["nonfinite_step"] == 0
    first_bad = clean & ~finite
    held = dict(state, nonfinite_step=jnp.where(first_bad, state["step"] + 1,
                                                state["nonfinite_step"]),
                nonfinite_loss=jnp.where(first_bad, loss, state["nonfinite_loss"]))
    ok = clean & finite
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, held), means

  def _step_given(self, state, backbone, batch, lr, lo, n_new, rows, k_drop):
    """One SGD step with the NCE rows and the dropout key given (the state's rng is kept), on
    model-ready images (normalised float): (state, loss, terms and accuracy)."""
    new, loss, metrics, _ = self._update(state, backbone, batch, lr, lo, n_new, rows, k_drop)
    return new, loss, metrics

  def _update(self, state, backbone, batch, lr, lo, n_new, rows, k_drop):
    """`_step_given` plus whether the loss and every gradient are finite."""
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    with ntkcl.matmul_precision(self.spec):  # the losses' matmuls too (docs/design.md)
      (loss, (terms, acc)), g = grad_fn(state["params"], state, backbone, batch, k_drop, rows,
                                        lo, n_new)
    upd, opt = self.tx.update(g, state["opt"], state["params"])
    params = jax.tree_util.tree_map(lambda p, u: p + lr * u, state["params"], upd)
    sums = {k: state["loss_sums"][k] + terms[k] for k in LOSS_TERMS}
    new = dict(state, params=params, opt=opt, loss_sums=sums,
               loss_count=state["loss_count"] + 1)
    finite = jnp.isfinite(loss)
    for leaf in jax.tree_util.tree_leaves(g):
      finite &= jnp.isfinite(leaf).all()
    return new, loss, dict(terms, accuracy=acc), finite

  # -- post-training (docs/method.md §3.3 steps 4-7) -------------------------------------------------------
  def _ema_fn(self, state, t):
    """Frozen lists <- t/(t+1) pre + 1/(t+1) cur (docs/method.md §3.4), or a constant-decay EMA (fix_ema:
    the first update copies, later ones use ema_decay)."""
    t = t.astype(jnp.float32)
    if self.config.method.frozen_update == "copy":  # ablation: the last task's values, no average
      w = jnp.zeros(())
    elif self.switches.fix_ema:
      w = jnp.where(t == 0, 0.0, self.config.method.ema_decay)
    else:
      w = t / (t + 1)
    frozen = {b: jax.tree_util.tree_map(lambda pre, cur: w * pre + (1 - w) * cur[None],
                                        state["frozen"][b], state["params"][b])
              for b in state["frozen"]}
    return dict(state, frozen=frozen)

  def features(self, backbone, trainable, frozen, images, *, train: bool = False, rng=None):
    """The model's features (ntkcl.features): the one place the learner runs the model, so that
    a model linearised around a checkpoint (ntk_analysis/linear_model.py) can stand in for it."""
    return ntkcl.features(self.spec, backbone, trainable, frozen, images, train=train, rng=rng)

  def _eval_features(self, state, backbone, images):
    return self.features(backbone, self.trainable(state), state["frozen"],
                         self.model_input(images))

  def _proto_sums_fn(self, state, backbone, batch):
    f = self._eval_features(state, backbone, batch["image"])["fused"]
    oh = jax.nn.one_hot(batch["label"], self.c) * batch["mask"][:, None]
    with ntkcl.matmul_precision(self.spec):  # float32 class sums at the model's precision
      return oh.T @ f, oh.sum(0)

  def _set_protos_fn(self, state, sums, counts):
    """fc rows of the classes seen in this pass <- unnormalised class means (docs/method.md §3.5)."""
    new = sums / jnp.maximum(counts, 1)[:, None]
    return dict(state, prototypes=jnp.where((counts > 0)[:, None], new, state["prototypes"]))

  def _eval_fn(self, state, backbone, batch, num_seen):
    f = self._eval_features(state, backbone, batch["image"])["fused"]
    logits = ntkcl.eval_logits(self.spec, state["prototypes"], f, num_seen)
    k = min(self.config.topk, self.c)
    top = jax.lax.top_k(logits, k)[1]
    y = batch["label"]
    return {"pred": top[:, 0], "topk": (top == y[:, None]).any(-1), "label": y,
            "mask": batch["mask"]}

  def _finish_fn(self, state, t, row):
    """after_task: reg targets <- current lists and fusion (docs/method.md §3.3 step 7); accuracy row."""
    return dict(state, reg_ref=jax.tree_util.tree_map(jnp.copy, self.trainable(state)),
                acc=state["acc"].at[t].set(row))

  # -- the pieces the launcher calls (host batches in, global arrays inside) ---------------------
  def abstract_state(self, key):
    """Shapes, dtypes and (replicated) shardings of init_state(key), computing nothing: the
    target a checkpoint is restored into."""
    rep = sharding.replicated(self.mesh)
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                  jax.eval_shape(self.init_state, key))

  def epochs(self) -> int:
    """Training epochs per task: optim.epochs, or 0 for simplecil (prototypes of the frozen
    backbone, no training)."""
    return 0 if self.method == "simplecil" else self.config.optim.epochs

  def check_task(self, t: int, classes: Sequence[int]) -> None:
    if len(classes) > self.n_max:
      raise ValueError(f"task {t} has {len(classes)} classes, more than max(init_cls, increment) "
                       f"= {self.n_max}; check data.init_cls / data.increment")

  def start_task(self, state):
    """Task start: fresh proxy head and optimiser, orthogonality basis from the prototypes."""
    return self._new_task(state)

  def train_step(self, state, batch, epoch: int, classes: Sequence[int], log: bool = False):
    """One SGD step on a batch of the task with these classes (this host's rows, or the global
    arrays of `device_batch`), at the cosine learning rate of `epoch`: (state, means of LOG_TERMS
    since the last step with `log=True`, this one included). Nothing is read back to the host:
    the state is donated, and a non-finite step is held in it (`status`)."""
    key = (epoch, classes[0], len(classes), bool(log))
    if key not in self._scalars:  # device scalars made once, not transferred every step
      cfg = self.config
      host = (np.float32(cosine_lr(cfg.optim.lr, epoch, cfg.optim.epochs)),
              np.int32(classes[0]), np.int32(len(classes)), np.bool_(log))
      self._scalars[key] = tuple(jax.device_put(x, self._rep) for x in host)
    lr, lo, n_new, log_now = self._scalars[key]
    return self._step(state, self.backbone, self._global(batch), lr, lo, n_new, log_now)

  @staticmethod
  def status(state) -> dict:
    """The leaves the launcher reads at its log points: {'step', 'nonfinite_step',
    'nonfinite_loss'} (still on the device)."""
    return {k: state[k] for k in ("step", "nonfinite_step", "nonfinite_loss")}

  def model_input(self, images):
    """uint8 or [0, 1] float images -> the model's input (`model.normalize`), bit-identical to
    normalising on the host."""
    chex.assert_rank(images, 4)
    return normalization.model_input(images, self.config.model.normalize)

  def device_batch(self, batch: dict) -> dict:
    """This host's rows of a batch -> global arrays split over the mesh's data axis."""
    return self._global(batch)

  def end_task(self, state, t: int, proto_batches: Iterable[dict]):
    """After training task t (docs/method.md §3.3 steps 4-5): EMA of the frozen sets, then the prototypes
    of its classes from `proto_batches` (its training images under the test transform)."""
    if t < self.t - 1 and state["frozen"]:
      state = self._ema(state, jnp.int32(t))
    return self.prototypes_from(state, proto_batches, f"task {t}")

  def prototypes_from(self, state, proto_batches: Iterable[dict], what: str = "prototypes"):
    """The state with the prototype of every class in `proto_batches` replaced by its class mean
    of the fused feature under this state (docs/method.md §3.5); other rows are kept. At a task
    end these are the task's classes; over all seen classes of a final state it is the
    oracle-prototype diagnostic (no stale prototypes, which no exemplar-free method can have)."""
    acc = None
    for batch in proto_batches:
      part = self._proto_sums(state, self.backbone, self._global_eval(batch))
      acc = part if acc is None else self._add(acc, part)
    if acc is None:
      raise ValueError(f"{what}: the 'proto' split yielded no batches")
    return self._set_protos(state, *acc)

  def evaluate(self, state, t: int, test_batches: Iterable[dict], tasks: Sequence[Sequence[int]]):
    """Top-1 / top-k over all classes seen up to task t (docs/method.md §4.2), per task, old and new, and
    the mean loss terms of task t's steps."""
    hi, lo = tasks[t][-1] + 1, tasks[t][0]
    preds, topk, labels = [], [], []
    for batch in test_batches:
      out = self._eval(state, self.backbone, self._global_eval(batch), jnp.int32(hi))
      m = np.asarray(out["mask"])
      preds.append(np.asarray(out["pred"])[m])
      topk.append(np.asarray(out["topk"])[m])
      labels.append(np.asarray(out["label"])[m])
    p, k, y = map(np.concatenate, (preds, topk, labels))
    per_task = []
    for s in range(t + 1):
      sel = np.isin(y, tasks[s])
      per_task.append(float(np.mean(p[sel] == y[sel]) * 100) if sel.any() else float("nan"))
    old = y < lo
    count = max(float(state["loss_count"]), 1.0)
    return {"task": t, "per_task_accuracy": per_task,
            "top1": float(np.around((p == y).mean() * 100, 2)),
            "topk": float(k.mean() * 100),
            "old_accuracy": float((p[old] == y[old]).mean() * 100) if old.any() else None,
            "new_accuracy": float((p[~old] == y[~old]).mean() * 100),
            "losses": {n: float(state["loss_sums"][n]) / count for n in LOSS_TERMS}}

  def finish_task(self, state, t: int, per_task_accuracy: Sequence[float]):
    """after_task (docs/method.md §3.3 step 7): L2 targets <- current lists and fusion; accuracy row t."""
    row = np.full(self.t, np.nan, np.float32)
    row[:t + 1] = per_task_accuracy
    return self._finish(state, np.int32(t), row)

  def _global(self, batch):
    if all(isinstance(v, jax.Array) for v in batch.values()):
      return batch  # already global (device_batch, e.g. prefetched)
    return sharding.global_batch(batch, self.mesh)

  def _global_eval(self, batch):
    """An eval batch of any size as global arrays: this host's rows padded (masked repeats,
    `sharding.pad_rows`) to a multiple of its devices on the mesh, so any eval batch size runs
    on any mesh; the masks keep padded rows out of prototypes and accuracies."""
    if all(isinstance(v, jax.Array) for v in batch.values()):
      return batch
    return self._global(sharding.pad_rows(batch, len(self.mesh.local_devices)))
