"""The NTK-CL task loop (spec method.md 0, 3, 4): train, EMA, prototypes, evaluate, reg targets.

Contract (ntkcl_jax/train.py, tests/_train_standins.py): `Learner(config, backbone_params, mesh)`,
`init_state(key)` (every leaf has a fixed shape for the whole run), `run(stream, state, position,
hooks) -> (state, history)`. Everything that carries between steps lives in the state, so resuming
from any hook position is bit-identical to an uninterrupted run.

State layout:
  params      {'channel', 'patch', 'fusion' (present branches, see models/ntkcl.py), 'proxy'}
  frozen      the pre_ lists, stacked (F, ...)        reg_ref     L2 targets (spec 2.5)
  prototypes  (C, Dt) class means of the fused feature (fc.weight); rows of unseen classes are 0
  orth_basis  (Dt, k) B of spec 2.4, computed once per task from the prototypes
  opt, rng, acc (T, T), loss_sums {term: sum over the task's steps}, loss_count
The trainable PEFT tree for the NTK analysis is `Learner.trainable(state)` (= params minus proxy).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcl_jax import losses
from ntkcl_jax import sharding
from ntkcl_jax import train
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import peft

SWITCHES = ("fix_fusion", "fix_nce_sign", "fix_orth", "fix_l2_all", "fix_ema", "fix_patch_init",
            "fix_old_pool")
LOSS_TERMS = ("loss", "ce_channel", "ce_patch", "ce_fused", "nce", "orth", "reg")


class NonFiniteLossError(FloatingPointError):
  """A train step produced a non-finite loss; raised before the step is applied."""


def method_flags(config) -> dict:
  """The corrected-mode switches (spec 10, plus fix_old_pool for spec 9 item 7).
  variant='official' forces all off;
  variant='corrected' honours each fix_* as set (all off == official)."""
  m = config.method
  if m.variant not in ("official", "corrected"):
    raise ValueError(f"method.variant must be 'official' or 'corrected', got {m.variant!r}")
  # .get: configs saved before a switch existed (older runs' checkpoints) read it as off
  return {s: bool(m.get(s, False)) and m.variant == "corrected" for s in SWITCHES}


def old_pool_size(lo, n_new, increment: int, fixed: bool):
  """How many prototypes the NCE term samples from (spec 2.3, 9 item 7). Official:
  `fc.weight[:-increment]`, i.e. seen classes minus `increment`; at task 0 with
  init_cls > increment that is init_cls - increment current-task (zero) rows. Fixed: the classes
  of earlier tasks, `lo`."""
  if fixed:
    return lo
  return jnp.maximum(lo + n_new - increment, 0)


def cosine_lr(lr0: float, epoch: int, epochs: int) -> float:
  """CosineAnnealingLR(T_max=E, eta_min=0) stepped per epoch (spec 3.1)."""
  return lr0 * (1 + math.cos(math.pi * epoch / epochs)) / 2


def sgd_torch(weight_decay: float, momentum: float) -> optax.GradientTransformation:
  """torch.optim.SGD with coupled weight decay; lr applied outside (updates * lr) (spec 3.1)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(1.0, momentum=momentum))


class Learner:
  """NTK-CL (and the channel / patch / simplecil / seq_adapter baselines) in one task loop."""

  def __init__(self, config, backbone_params, mesh):
    self.config, self.mesh = config, mesh
    self.flags = method_flags(config)
    self.vcfg = train.vit_config(config)
    self.spec = ntkcl.spec_from_config(config, self.vcfg, fix_fusion=self.flags["fix_fusion"],
                                       fix_patch_init=self.flags["fix_patch_init"])
    d = config.data
    self.c, self.t = d.num_classes, train.num_tasks(config)
    self.n_max = max(d.init_cls, d.increment)
    self.method = config.method.name
    self.backbone = sharding.put_replicated(backbone_params, mesh)
    self.tx = sgd_torch(config.optim.weight_decay, config.optim.momentum)
    rep, bat = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    self._init = jax.jit(self._init_state, out_shardings=rep)
    self._new_task = jax.jit(self._new_task_fn, in_shardings=(rep,), out_shardings=rep)
    self._step = jax.jit(self._train_step, in_shardings=(rep, rep, bat, rep, rep, rep),
                         out_shardings=(rep, rep, rep))
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
            "loss_sums": {t: jnp.zeros(()) for t in LOSS_TERMS}, "loss_count": jnp.zeros(())}

  @staticmethod
  def trainable(state) -> dict:
    """The PEFT tree the NTK analysis differentiates (current lists + fusion, no proxy head)."""
    return {k: v for k, v in state["params"].items() if k != "proxy"}

  @staticmethod
  def frozen(state) -> dict:
    return state["frozen"]

  def _new_task_fn(self, state):
    """Task start (spec 3.3 step 1): fresh proxy head + optimiser, B from the prototypes."""
    rng, key = jax.random.split(state["rng"])
    params = dict(state["params"], proxy=peft.init_cosine(key, self.n_max, self.spec.feature_dim))
    basis = losses.orth_basis(state["prototypes"], state["orth_basis"].shape[1],
                              corrected=self.flags["fix_orth"])
    return dict(state, params=params, opt=self.tx.init(params), rng=rng, orth_basis=basis,
                loss_sums={t: jnp.zeros(()) for t in LOSS_TERMS}, loss_count=jnp.zeros(()))

  # -- training --------------------------------------------------------------------------------
  def _loss(self, params, state, backbone, batch, keys, lo, n_new):
    """Spec 2: the per-batch loss and its terms."""
    spec, m = self.spec, self.config.method
    mask, labels = batch["mask"], batch["label"]
    local = jnp.clip(labels - lo, 0, self.n_max - 1)
    trainable = {k: v for k, v in params.items() if k != "proxy"}
    f = ntkcl.features(spec, backbone, trainable, state["frozen"], batch["image"], train=True,
                       rng=keys[0])
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
      # NCE over [fused ; sampled old prototypes] (spec 2.3)
      kk = self.config.optim.batch_size
      n_old = old_pool_size(lo, n_new, self.config.data.increment, self.flags["fix_old_pool"])
      old = jnp.arange(self.c) < n_old
      order = jnp.argsort(jnp.where(old, jax.random.uniform(keys[1], (self.c,)), 2.0))
      j = order[:kk] if kk <= self.c else jnp.pad(order, (0, kk - self.c))
      jvalid = jnp.arange(kk) < jnp.minimum(kk, n_old)
      z = jnp.concatenate([f["fused"], jax.lax.stop_gradient(state["prototypes"][j])])
      nce_val, _ = losses.nce(z, jnp.concatenate([labels, j.astype(labels.dtype)]),
                              jnp.concatenate([mask, jvalid]), m.nce_tau)
      terms["nce"] = losses.finite_or_zero(nce_val if self.flags["fix_nce_sign"] else -nce_val)
      orth = losses.orth_corrected if self.flags["fix_orth"] else losses.orth_official
      terms["orth"] = losses.finite_or_zero(orth(f["channel"], f["patch"], state["orth_basis"],
                                                 mask))
      terms["reg"] = losses.finite_or_zero(losses.l2_reg(trainable, state["reg_ref"],
                                                         all_params=self.flags["fix_l2_all"]))
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

  def _train_step(self, state, backbone, batch, lr, lo, n_new):
    rng, k_drop, k_perm = jax.random.split(state["rng"], 3)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (loss, (terms, acc)), g = grad_fn(state["params"], state, backbone, batch, (k_drop, k_perm),
                                      lo, n_new)
    upd, opt = self.tx.update(g, state["opt"], state["params"])
    params = jax.tree_util.tree_map(lambda p, u: p + lr * u, state["params"], upd)
    sums = {k: state["loss_sums"][k] + terms[k] for k in LOSS_TERMS}
    new = dict(state, params=params, opt=opt, rng=rng, loss_sums=sums,
               loss_count=state["loss_count"] + 1)
    return new, loss, dict(terms, accuracy=acc)

  # -- post-training (spec 3.3 steps 4-7) -------------------------------------------------------
  def _ema_fn(self, state, t):
    """Frozen lists <- t/(t+1) pre + 1/(t+1) cur (spec 3.4), or a constant-decay EMA (fix_ema:
    the first update copies, later ones use ema_decay)."""
    t = t.astype(jnp.float32)
    if self.flags["fix_ema"]:
      w = jnp.where(t == 0, 0.0, self.config.method.ema_decay)
    else:
      w = t / (t + 1)
    frozen = {b: jax.tree_util.tree_map(lambda pre, cur: w * pre + (1 - w) * cur[None],
                                        state["frozen"][b], state["params"][b])
              for b in state["frozen"]}
    return dict(state, frozen=frozen)

  def _eval_features(self, state, backbone, images):
    return ntkcl.features(self.spec, backbone, self.trainable(state), state["frozen"], images)

  def _proto_sums_fn(self, state, backbone, batch):
    f = self._eval_features(state, backbone, batch["image"])["fused"]
    oh = jax.nn.one_hot(batch["label"], self.c) * batch["mask"][:, None]
    return oh.T @ f, oh.sum(0)

  def _set_protos_fn(self, state, sums, counts):
    """fc rows of the classes seen in this pass <- unnormalised class means (spec 3.5)."""
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
    """after_task: reg targets <- current lists and fusion (spec 3.3 step 7); accuracy row."""
    return dict(state, reg_ref=jax.tree_util.tree_map(jnp.copy, self.trainable(state)),
                acc=state["acc"].at[t].set(row))

  def _global(self, batch):
    return sharding.global_batch(batch, self.mesh)

  def post_train(self, stream, state, t):
    """EMA -> prototypes -> (caller evaluates) in the official order; deterministic."""
    if t < self.t - 1 and state["frozen"]:
      state = self._ema(state, jnp.int32(t))
    bsz = self.config.optim.eval_batch_size
    acc = None
    for batch in stream.eval_batches("proto", stream.tasks[t], bsz):
      part = self._proto_sums(state, self.backbone, self._global(batch))
      acc = part if acc is None else self._add(acc, part)
    if acc is None:
      raise ValueError(f"task {t}: the 'proto' split yielded no batches")
    return self._set_protos(state, *acc)

  def evaluate(self, stream, state, t):
    """Top-1 / top-k over all seen classes (spec 4.2); returns the task result dict."""
    hi = stream.tasks[t][-1] + 1
    lo = stream.tasks[t][0]
    seen = [c for s in range(t + 1) for c in stream.tasks[s]]
    preds, topk, labels = [], [], []
    for batch in stream.eval_batches("test", seen, self.config.optim.eval_batch_size):
      out = self._eval(state, self.backbone, self._global(batch), jnp.int32(hi))
      m = np.asarray(out["mask"])
      preds.append(np.asarray(out["pred"])[m])
      topk.append(np.asarray(out["topk"])[m])
      labels.append(np.asarray(out["label"])[m])
    p, k, y = map(np.concatenate, (preds, topk, labels))
    per_task = []
    for s in range(t + 1):
      sel = np.isin(y, stream.tasks[s])
      per_task.append(float(np.mean(p[sel] == y[sel]) * 100) if sel.any() else float("nan"))
    old = y < lo
    count = max(float(state["loss_count"]), 1.0)
    return {"task": t, "per_task_accuracy": per_task,
            "top1": float(np.around((p == y).mean() * 100, 2)),
            "topk": float(k.mean() * 100),
            "old_accuracy": float((p[old] == y[old]).mean() * 100) if old.any() else None,
            "new_accuracy": float((p[~old] == y[~old]).mean() * 100),
            "losses": {n: float(state["loss_sums"][n]) / count for n in LOSS_TERMS}}

  # -- the loop ----------------------------------------------------------------------------------
  def run(self, stream, state, position=None, hooks=None):
    cfg = self.config
    pos = dict(position or {"task": 0, "epoch": 0, "batch": 0, "phase": "train"})
    bsz, epochs = cfg.optim.batch_size, cfg.optim.epochs
    if self.method == "simplecil":
      epochs = 0  # prototypes of the frozen backbone, no training
    history = []
    for t in range(pos["task"], stream.num_tasks):
      lo, n_new = stream.tasks[t][0], len(stream.tasks[t])
      if n_new > self.n_max:
        raise ValueError(f"task {t} has {n_new} classes, more than max(init_cls, increment) = "
                         f"{self.n_max}; check data.init_cls / data.increment")
      if pos["phase"] == "train":
        if pos["epoch"] == 0 and pos["batch"] == 0:
          state = self._new_task(state)
        nb = stream.num_train_batches(t, bsz)
        for e in range(pos["epoch"], epochs):
          lr = jnp.float32(cosine_lr(cfg.optim.lr, e, epochs))
          start = pos["batch"] if e == pos["epoch"] else 0
          for b, batch in enumerate(stream.train_batches(t, e, bsz, start_batch=start), start):
            new, loss, metrics = self._step(state, self.backbone, self._global(batch), lr,
                                            jnp.int32(lo), jnp.int32(n_new))
            if not np.isfinite(float(loss)):
              raise NonFiniteLossError(f"task {t} epoch {e} step {b}: non-finite loss "
                                       f"{float(loss)}; lower optim.lr or check the inputs")
            state = new
            nxt = ({"task": t, "epoch": e, "batch": b + 1, "phase": "train"} if b + 1 < nb else
                   {"task": t, "epoch": e + 1, "batch": 0, "phase": "train"} if e + 1 < epochs
                   else {"task": t, "epoch": epochs, "batch": 0, "phase": "eval"})
            if hooks:
              hooks.on_step(state, nxt, dict(metrics, loss=loss))
      state = self.post_train(stream, state, t)
      result = self.evaluate(stream, state, t)
      row = np.full(self.t, np.nan, np.float32)
      row[:t + 1] = result["per_task_accuracy"]
      state = self._finish(state, np.int32(t), row)
      history.append(result)
      pos = {"task": t + 1, "epoch": 0, "batch": 0, "phase": "train"}
      if hooks:
        hooks.on_task_end(state, pos, result)
    return state, history

