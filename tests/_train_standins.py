"""Small stand-ins for the data stream and the learner, honouring their contracts (docs/design.md,
the launcher brief), so the launcher's device, process, resume and fault tests do not depend on
the full NTK-CL method. They do real work: a frozen tiny ViT, a trainable cosine head trained with
SGD + momentum under jax.jit with explicit shardings, an RNG that is consumed every step, and a
(T, T) accuracy matrix inside the state.

Run as a script it is the launcher with these components:
    python tests/_train_standins.py --config=configs/tiny.py --workdir=...
"""
from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ntkcl_jax import sharding  # noqa: E402
from ntkcl_jax import train  # noqa: E402
from ntkcl_jax.models import vit  # noqa: E402


class NonFiniteLossError(FloatingPointError):
  pass


class Stream:
  """Synthetic class-incremental stream: class templates plus noise, per-host rows of batches."""

  def __init__(self, config, process_index: int, process_count: int):
    d = config.data
    c, size = d.num_classes, config.model.image_size
    if d.init_cls > c:
      raise ValueError(f"init_cls {d.init_cls} > num_classes {c}")
    self.pi, self.pc, self.seed = process_index, process_count, config.seed
    self.class_order = (np.random.RandomState(config.seed).permutation(c)
                        if d.class_order == "seed" else np.arange(c))
    bounds = [0, d.init_cls]
    while bounds[-1] < c:
      bounds.append(min(c, bounds[-1] + d.increment))
    self.tasks = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    self.num_tasks, self.num_classes = len(self.tasks), c
    rng = np.random.RandomState(1234)
    templates = rng.rand(c, size, size, 3).astype(np.float32)
    ntr, nte = d.max_per_class_train or 12, d.max_per_class_test or 8

    def make(n, salt):
      r = np.random.RandomState(salt)
      x = np.concatenate([templates[self.class_order[k]] + 0.6 * r.randn(n, size, size, 3)
                          for k in range(c)]).astype(np.float32)
      return x, np.repeat(np.arange(c), n).astype(np.int32)
    self.train_x, self.train_y = make(ntr, 1)
    self.test_x, self.test_y = make(nte, 2)

  def _idx(self, labels, classes):
    return np.flatnonzero(np.isin(labels, classes))

  def num_train_batches(self, task, batch_size):
    return math.ceil(len(self._idx(self.train_y, self.tasks[task])) / batch_size)

  def _batches(self, x, y, idx, batch_size, start):
    per = batch_size // self.pc
    for b in range(start, math.ceil(len(idx) / batch_size)):
      rows = idx[b * batch_size:(b + 1) * batch_size]
      mask = np.zeros(batch_size, bool)
      mask[:len(rows)] = True
      rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
      sl = slice(self.pi * per, (self.pi + 1) * per)
      yield {"image": x[rows][sl], "label": y[rows][sl], "mask": mask[sl]}

  def train_batches(self, task, epoch, batch_size, start_batch=0):
    idx = self._idx(self.train_y, self.tasks[task])
    idx = np.random.RandomState([self.seed, task, epoch]).permutation(idx)
    return self._batches(self.train_x, self.train_y, idx, batch_size, start_batch)

  def eval_batches(self, split, classes, batch_size):
    assert split == "test"
    return self._batches(self.test_x, self.test_y, self._idx(self.test_y, classes), batch_size, 0)


class Learner:
  """Frozen ViT features + a cosine head over all classes; trains the head on the current task."""

  def __init__(self, config, backbone_params, mesh):
    self.config, self.mesh = config, mesh
    self.vcfg = train.vit_config(config)
    self.model = vit.ViT(self.vcfg)
    self.backbone = sharding.put_replicated(backbone_params, mesh)
    c, t = config.data.num_classes, train.num_tasks(config)
    self.c, self.t = c, t
    o = config.optim
    self.tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                          optax.sgd(1.0, momentum=o.momentum))
    rep, bat = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    self._step = jax.jit(self._train_step, in_shardings=(rep, rep, bat, rep, rep, rep),
                         out_shardings=(rep, rep, rep))
    self._eval = jax.jit(self._eval_step, in_shardings=(rep, rep, bat, rep),
                         out_shardings=rep)
    # State changes outside the train step also run under jit, so every leaf stays a global
    # replicated array (device_put of host values checks equality across processes, NaN != NaN).
    self._init = jax.jit(self._init_state, out_shardings=rep)
    self._new_task = jax.jit(lambda s: dict(s, opt=self.tx.init(s["head"]),
                                            loss_sum=jnp.zeros(()), loss_count=jnp.zeros(())),
                             out_shardings=rep)
    self._set_row = jax.jit(lambda s, t, row: dict(s, acc=s["acc"].at[t].set(row)),
                            out_shardings=rep)

  def init_state(self, key):
    return self._init(key)

  def _init_state(self, key):
    d = self.vcfg.hidden_size
    head = {"w": jax.random.normal(jax.random.fold_in(key, 1), (d, self.c)) * 0.02,
            "scale": jnp.asarray(8.0)}
    return {"head": head, "opt": self.tx.init(head), "rng": jax.random.fold_in(key, 2),
            "acc": jnp.full((self.t, self.t), jnp.nan, jnp.float32),
            "loss_sum": jnp.zeros(()), "loss_count": jnp.zeros(())}

  def _logits(self, head, images, noise_key=None):
    f = self.model.apply({"params": self.backbone}, images)
    if noise_key is not None:
      f = f + 0.05 * jax.random.normal(noise_key, f.shape)
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    w = head["w"] / jnp.linalg.norm(head["w"], axis=0, keepdims=True)
    return head["scale"] * f @ w

  def _train_step(self, state, backbone, batch, lr, lo, hi):
    del backbone
    rng, key = jax.random.split(state["rng"])
    cls = jnp.arange(self.c)

    def loss_fn(head):
      logits = self._logits(head, batch["image"], key)
      logits = jnp.where((cls >= lo) & (cls < hi), logits, -1e9)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      m = batch["mask"].astype(jnp.float32)
      return (ce * m).sum() / m.sum(), logits

    (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(state["head"])
    upd, opt = self.tx.update(g, state["opt"], state["head"])
    head = optax.apply_updates(state["head"], jax.tree_util.tree_map(lambda u: lr * u, upd))
    m = batch["mask"]
    acc = ((logits.argmax(-1) == batch["label"]) & m).sum() / m.sum() * 100
    new = dict(state, head=head, opt=opt, rng=rng, loss_sum=state["loss_sum"] + loss,
               loss_count=state["loss_count"] + 1)
    return new, loss, acc

  def _eval_step(self, state, backbone, batch, hi):
    del backbone
    logits = self._logits(state["head"], batch["image"])
    logits = jnp.where(jnp.arange(self.c) < hi, logits, -jnp.inf)
    top = jax.lax.top_k(logits, self.config.topk)[1]
    y = batch["label"]
    return {"pred": top[:, 0], "topk": (top == y[:, None]).any(-1), "label": y,
            "mask": batch["mask"]}

  def run(self, stream, state, position=None, hooks=None):
    cfg = self.config
    pos = dict(position or {"task": 0, "epoch": 0, "batch": 0, "phase": "train"})
    bsz, epochs = cfg.optim.batch_size, cfg.optim.epochs
    history = []
    for t in range(pos["task"], stream.num_tasks):
      lo, hi = stream.tasks[t][0], stream.tasks[t][-1] + 1
      if pos["phase"] == "train":
        if pos["epoch"] == 0 and pos["batch"] == 0:  # new task: fresh optimiser, loss means
          state = self._new_task(state)
        nb = stream.num_train_batches(t, bsz)
        for e in range(pos["epoch"], epochs):
          lr = cfg.optim.lr * (1 + math.cos(math.pi * e / epochs)) / 2
          start = pos["batch"] if e == pos["epoch"] else 0
          for b, batch in enumerate(stream.train_batches(t, e, bsz, start_batch=start), start):
            new, loss, acc = self._step(state, self.backbone, sharding.global_batch(batch,
                                                                                     self.mesh),
                                        jnp.float32(lr), jnp.int32(lo), jnp.int32(hi))
            if not np.isfinite(float(loss)):
              raise NonFiniteLossError(f"task {t} epoch {e} step {b}: loss {float(loss)}")
            state = new
            nxt = ({"task": t, "epoch": e, "batch": b + 1, "phase": "train"} if b + 1 < nb else
                   {"task": t, "epoch": e + 1, "batch": 0, "phase": "train"} if e + 1 < epochs
                   else {"task": t, "epoch": epochs, "batch": 0, "phase": "eval"})
            if hooks:
              hooks.on_step(state, nxt, {"loss": loss, "accuracy": acc})
        pos = {"task": t, "epoch": epochs, "batch": 0, "phase": "eval"}
      # evaluation over all seen classes
      preds, topk, labels = [], [], []
      seen = [c for s in range(t + 1) for c in stream.tasks[s]]
      for batch in stream.eval_batches("test", seen, cfg.optim.eval_batch_size):
        out = self._eval(state, self.backbone, sharding.global_batch(batch, self.mesh),
                         jnp.int32(hi))
        m = np.asarray(out["mask"])
        preds.append(np.asarray(out["pred"])[m])
        topk.append(np.asarray(out["topk"])[m])
        labels.append(np.asarray(out["label"])[m])
      p, k, y = map(np.concatenate, (preds, topk, labels))
      per_task = [float(np.mean(p[np.isin(y, stream.tasks[s])] == y[np.isin(y, stream.tasks[s])])
                        * 100) for s in range(t + 1)]
      acc_row = np.full(self.t, np.nan, np.float32)
      acc_row[:t + 1] = per_task
      state = self._set_row(state, t, acc_row)
      old = np.isin(y, seen[:lo])
      result = {"task": t, "per_task_accuracy": per_task,
                "top1": float(np.around((p == y).mean() * 100, 2)), "topk": float((k.mean()) * 100),
                "old_accuracy": float((p[old] == y[old]).mean() * 100) if old.any() else None,
                "new_accuracy": float((p[~old] == y[~old]).mean() * 100),
                "losses": {"loss": float(state["loss_sum"] / state["loss_count"])}}
      history.append(result)
      pos = {"task": t + 1, "epoch": 0, "batch": 0, "phase": "train"}
      if hooks:
        hooks.on_task_end(state, pos, result)
    return state, history


def random_backbone(config):
  return vit.init_params(train.vit_config(config), jax.random.PRNGKey(config.seed))


COMPONENTS = train.Components(build_backbone=random_backbone, build_stream=Stream,
                              learner_cls=Learner, non_finite_error=NonFiniteLossError)


def real_modules_available() -> bool:
  """True once the project's learner and data modules exist (then tests also run them)."""
  import importlib.util as u  # pylint: disable=g-import-not-at-top
  try:
    return (u.find_spec("ntkcl_jax.learner") is not None
            and u.find_spec("ntkcl_jax.data") is not None
            and hasattr(__import__("ntkcl_jax.data", fromlist=["build_stream"]), "build_stream"))
  except ImportError:
    return False


def skip_unless_real(kind: str) -> None:
  import pytest  # pylint: disable=g-import-not-at-top
  if kind == "real" and not real_modules_available():
    pytest.skip("ntkcl_jax.learner / ntkcl_jax.data not written yet: only the stand-ins run")


def launcher_argv(kind: str) -> list[str]:
  """Command prefix of the launcher: with these stand-ins, or the real `python -m ntkcl_jax.train`
  (run with cwd = the repository root)."""
  if kind == "standin":
    return [sys.executable, os.path.abspath(__file__)]
  return [sys.executable, "-m", "ntkcl_jax.train"]


KINDS = ("standin", "real")


if __name__ == "__main__":
  train.main(COMPONENTS)
