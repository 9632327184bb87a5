"""The train loop without per-step host syncs: it reads the device only at its read points (log
steps, checkpoint saves, task ends); the non-finite check inside the jitted step holds the last
good state; the donated state; the uint8 step equals the host-normalised float step."""
import collections
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import checkpoints
from ntkcl_jax import data
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import normalization
from ntkcl_jax import sharding
from ntkcl_jax import train
from ntkcl_jax.checkpoints import run_state
from test_train import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def _small(**overrides):
  """tiny.py with 2 tasks x 2 epochs x 3 batches = 12 train steps."""
  return tiny_config(**{"data.num_classes": 4, **overrides})


class HostSync(AssertionError):
  """The launcher used a device value other than through `train.host_read`."""


class Sealed:
  """A device value the launcher may only hand back (to the learner, the checkpointer or
  `train.host_read`): reading it on the host in any other way raises HostSync."""

  def __init__(self, value):
    self.value = value

  def _sync(self, *_, **__):
    raise HostSync("the train loop read a device value outside train.host_read")

  __array__ = __float__ = __int__ = __bool__ = __index__ = __len__ = _sync
  __getitem__ = __iter__ = __format__ = __str__ = _sync


def _unseal(tree):
  return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, Sealed) else x, tree,
                                is_leaf=lambda x: isinstance(x, Sealed))


def _instrument(monkeypatch):
  """Seals what the train step returns; records, per read, how many steps were dispatched."""
  log = {"steps": 0, "reads": []}
  step, status = learner_lib.Learner.train_step, learner_lib.Learner.status
  end_task, save = learner_lib.Learner.end_task, run_state.RunCheckpointer.save
  read = train.host_read

  def train_step(self, state, *args, **kwargs):
    new, means = step(self, _unseal(state), *args, **kwargs)
    log["steps"] += 1
    return Sealed(new), Sealed(means)

  def host_read(tree):
    log["reads"].append(log["steps"])
    return read(_unseal(tree))
  monkeypatch.setattr(learner_lib.Learner, "train_step", train_step)
  monkeypatch.setattr(learner_lib.Learner, "status",
                      staticmethod(lambda state: Sealed(status(_unseal(state)))))
  monkeypatch.setattr(learner_lib.Learner, "end_task",
                      lambda self, state, *a: end_task(self, _unseal(state), *a))
  monkeypatch.setattr(run_state.RunCheckpointer, "save",
                      lambda self, i, state, meta: save(self, i, _unseal(state), meta))
  monkeypatch.setattr(train, "host_read", host_read)
  return log


@pytest.mark.slow
def test_train_loop_reads_the_device_only_at_read_points(tmp_path, monkeypatch):
  log_every, ckpt_every, per_task, total = 5, 4, 6, 12
  log = _instrument(monkeypatch)
  res = train.run(_small(**{"train.log_every_steps": log_every,
                            "train.checkpoint_every_steps": ckpt_every}),
                  str(tmp_path), progress=False)
  assert log["steps"] == total and len(res["accuracy_matrix"]) == 2
  logged = {s for s in range(1, total + 1) if s % log_every == 0 or s == 1 or s % per_task == 0}
  saved = {s for s in range(1, total + 1) if s % ckpt_every == 0}
  # one read (a few scalars) per read point, none on any other step
  syncs = collections.Counter(log["reads"])
  assert syncs == collections.Counter(sorted(logged | saved)), syncs
  assert [s for s in range(1, total + 1) if syncs[s] == 0] == [2, 3, 7, 9, 11]
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines if l["event"] == "step"] == sorted(logged)


@pytest.mark.slow
def test_logged_values_are_means_since_the_previous_line(tmp_path):
  """log_every_steps=3 logs the means of what log_every_steps=1 logs step by step."""
  runs = {}
  for every in (1, 3):
    wd = tmp_path / str(every)
    train.run(_small(**{"train.log_every_steps": every, "train.checkpoint_every_steps": 0,
                        "optim.epochs": 1}), str(wd), progress=False)
    runs[every] = {l["step"]: l for l in map(json.loads, open(wd / "metrics.jsonl"))
                   if l["event"] == "step"}
  assert sorted(runs[1]) == [1, 2, 3, 4, 5, 6] and sorted(runs[3]) == [1, 3, 6]
  for step, since in ((1, [1]), (3, [2, 3]), (6, [4, 5, 6])):
    for k in learner_lib.LOG_TERMS:
      want = np.mean([runs[1][s][k] for s in since])
      assert runs[3][step][k] == pytest.approx(want, rel=1e-5, abs=1e-6), (step, k)


@functools.lru_cache(maxsize=None)
def _learner_and_stream(normalize):
  cfg = _small(**{"model.normalize": normalize})
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  return learner_lib.Learner(cfg, checkpoints.build_backbone(cfg), mesh), data.build_stream(cfg)


def _learner(normalize="none"):
  """(learner, stream, a fresh task-0 state): the learner is shared, so its steps compile once."""
  lrn, stream = _learner_and_stream(normalize)
  return lrn, stream, lrn.start_task(lrn.init_state(jax.random.PRNGKey(1)))


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _assert_same(a, b, skip=()):
  fa = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(a)}
  fb = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(b)}
  assert fa.keys() == fb.keys()
  for k in fa:
    if not any(s in k for s in skip):
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_non_finite_step_is_held_in_the_state_and_later_steps_too():
  lrn, stream, state = _learner()
  classes = stream.tasks[0]
  good = next(iter(stream.train_batches(0, 0, 8)))
  state, _ = lrn.train_step(state, good, 0, classes)
  before = _host(state)
  assert before["step"] == 1 and before["nonfinite_step"] == 0
  bad = dict(good, image=np.where(np.arange(16)[None, :, None, None] == 3, np.nan,
                                  good["image"] / np.float32(255)).astype(np.float32))
  state, _ = lrn.train_step(state, bad, 0, classes)
  after = _host(state)
  assert after["nonfinite_step"] == 2 and np.isnan(after["nonfinite_loss"])
  _assert_same(after, before, skip=("nonfinite",))  # nothing of the bad update was applied
  state, _ = lrn.train_step(state, good, 0, classes)  # a finite batch after it: still held
  _assert_same(_host(state), after)
  status = _host(lrn.status(state))
  assert (status["step"], status["nonfinite_step"]) == (1, 2)


def test_train_step_donates_the_state():
  lrn, stream, state = _learner()
  old = jax.tree_util.tree_leaves(state)
  new, _ = lrn.train_step(state, next(iter(stream.train_batches(0, 0, 8))), 0, stream.tasks[0])
  assert all(x.is_deleted() for x in old)
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(new))


@pytest.mark.parametrize("normalize", ["imagenet", "none"])
def test_uint8_step_equals_the_host_normalised_float_step(normalize):
  """The step on the stream's uint8 batch (normalised on the device) equals `step_given` on the
  float32 batch normalised on the host, as the stream used to send it."""
  lrn, stream, state = _learner(normalize)
  batch = next(iter(stream.train_batches(0, 0, 8)))
  assert batch["image"].dtype == np.uint8
  floats = normalization.normalize(batch["image"].astype(np.float32) / 255.0, normalize)
  rng, k_drop, k_perm = jax.random.split(state["rng"], 3)
  lo, n = jnp.int32(stream.tasks[0][0]), jnp.int32(len(stream.tasks[0]))
  lr = jnp.float32(learner_lib.cosine_lr(lrn.config.optim.lr, 0, lrn.config.optim.epochs))
  want, loss, _ = lrn.step_given(dict(state, rng=rng), lrn.backbone,
                                 dict(batch, image=jnp.asarray(floats)), lr, lo, n,
                                 lrn.nce_rows(k_perm, lo, n), k_drop)
  want, loss = _host(want), float(loss)
  got, means = lrn.train_step(state, batch, 0, stream.tasks[0], log=True)
  assert float(means["loss"]) == loss
  _assert_same(_host(got)["params"], want["params"])
  _assert_same(_host(got)["opt"], want["opt"])


@pytest.mark.slow
def test_launcher_stops_at_the_next_read_naming_the_step(tmp_path):
  """lr = inf: step 1 is finite but its update is not, so step 2 is held. With reads every 4
  steps and no step checkpoints, the stop comes at step 4 and names step 2; nothing is saved."""
  config = _small(**{"optim.lr": float("inf"), "train.log_every_steps": 4,
                     "train.checkpoint_every_steps": 0})
  with pytest.raises(train.NonFiniteStop, match=r"task 0 epoch 0 step 1, at global step 2 "
                     r"\(seen at step 4"):
    train.run(config, str(tmp_path), progress=False)
  ck = run_state.RunCheckpointer(str(tmp_path / "checkpoints"))
  assert ck.all_ids() == []
  ck.close()
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines if l["event"] == "step"] == [1]
