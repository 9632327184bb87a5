"""The NTK-CL task loop: EMA closed forms, masking, non-finite guard, fixed state shapes, patch
fixed point, end-to-end accuracy of every method/variant, bit-identical resume."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _train_standins as standins
from configs import base
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import sharding
from ntkcl_jax import train
from ntkcl_jax import tree_utils
from ntkcl_jax.models import vit

ALL_FIXES = {s: True for s in learner_lib.SWITCHES}


class ColourStream(standins.Stream):
  """The stand-in stream with easily separable classes (colour + pattern templates, low noise)
  and the 'proto' split (train images) the learner needs for prototypes."""

  def __init__(self, config, process_index=0, process_count=1):
    super().__init__(config, process_index, process_count)
    r = np.random.RandomState(7)
    size = config.model.image_size
    tmpl = 0.5 * r.rand(self.num_classes, 1, 1, 3) + 0.5 * r.rand(self.num_classes, size, size, 3)
    self.train_x = (tmpl[self.train_y] + 0.15 * r.randn(*self.train_x.shape)).astype(np.float32)
    self.test_x = (tmpl[self.test_y] + 0.15 * r.randn(*self.test_x.shape)).astype(np.float32)

  def eval_batches(self, split, classes, batch_size):
    if split == "proto":
      return self._batches(self.train_x, self.train_y, self._idx(self.train_y, classes),
                           batch_size, 0)
    return super().eval_batches(split, classes, batch_size)


def make_config(method="ntkcl", variant="official", **method_fields):
  c = base.get_config()
  c.model.name, c.model.image_size = "tiny", 16
  c.model.overrides.update(dict(patch_size=4, num_layers=2, hidden_size=32, num_heads=2,
                                mlp_dim=64))
  c.data.num_classes, c.data.init_cls, c.data.increment = 6, 2, 2
  c.optim.update(dict(epochs=2, batch_size=8, eval_batch_size=16, lr=0.05))
  c.method.name, c.method.variant = method, variant
  c.method.update(method_fields)
  c.topk = 2
  return c


class Recorder:
  """Hooks that keep every (position, state) the learner hands out."""

  def __init__(self):
    self.steps, self.ends = [], []

  def on_step(self, state, position, metrics):
    assert np.isfinite(float(metrics["loss"]))
    self.steps.append((dict(position), state, {k: float(v) for k, v in metrics.items()}))

  def on_task_end(self, state, position, result):
    self.ends.append((dict(position), state, result))


@functools.lru_cache(maxsize=None)
def _learner(method, variant, fixes):
  cfg = make_config(method, variant, **dict(fixes))
  mesh = sharding.make_mesh()
  backbone = vit.init_params(train.vit_config(cfg), jax.random.PRNGKey(0))
  return learner_lib.Learner(cfg, backbone, mesh), ColourStream(cfg)


@functools.lru_cache(maxsize=None)
def _run(method="ntkcl", variant="official", fixes=()):
  lrn, stream = _learner(method, variant, fixes)
  init = lrn.init_state(jax.random.PRNGKey(1))
  rec = Recorder()
  state, history = lrn.run(stream, init, hooks=rec)
  return lrn, stream, init, state, history, rec


def _assert_trees_identical(a, b):
  fa, fb = tree_utils.flatten(a), tree_utils.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _flat_state(state):
  return {"/".join(map(str, p)): v for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_method_flags_official_forces_switches_off():
  cfg = make_config(variant="official", **ALL_FIXES)
  assert not any(learner_lib.method_flags(cfg).values())
  cfg.method.variant = "corrected"
  assert all(learner_lib.method_flags(cfg).values())
  cfg.method.variant = "fixed"
  with pytest.raises(ValueError, match="official"):
    learner_lib.method_flags(cfg)


@pytest.mark.parametrize("fix_ema", [False, True])
def test_frozen_sets_follow_closed_form_after_t_tasks(fix_ema):
  """spec 3.4: running mean of end-of-task values (official), or copy-then-EMA (fix_ema)."""
  fixes = (("fix_ema", True), ("ema_decay", 0.7)) if fix_ema else ()
  lrn, _ = _learner("ntkcl", "corrected", fixes)
  state = lrn.init_state(jax.random.PRNGKey(3))
  ends = [jax.tree_util.tree_map(lambda x, s=s: x + float(s + 1), state["params"]["channel"])
          for s in range(4)]
  for t, cur in enumerate(ends):
    state = lrn._ema(dict(state, params=dict(state["params"], channel=cur)), jnp.int32(t))
  if fix_ema:
    want = ends[0]
    for cur in ends[1:]:
      want = jax.tree_util.tree_map(lambda a, b: 0.7 * a + 0.3 * b, want, cur)
  else:
    want = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *ends)
  got = jax.tree_util.tree_map(lambda x: x[0], state["frozen"]["channel"])
  for k, v in tree_utils.flatten(want).items():
    np.testing.assert_allclose(tree_utils.flatten(got)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_masked_rows_do_not_change_the_step():
  lrn, stream = _learner("ntkcl", "official", ())
  state = lrn._new_task(lrn.init_state(jax.random.PRNGKey(4)))
  batch = next(stream.train_batches(0, 0, 8))
  batch["mask"] = batch["mask"].copy()
  batch["mask"][5:] = False
  other = dict(batch, image=batch["image"].copy(), label=batch["label"].copy())
  other["image"][5:] = 9.0
  other["label"][5:] = 1 - other["label"][5:]
  outs = [lrn._step(state, lrn.backbone, sharding.global_batch(b, lrn.mesh), jnp.float32(0.05),
                    jnp.int32(0), jnp.int32(2)) for b in (batch, other)]
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  _assert_trees_identical(outs[0][0]["params"], outs[1][0]["params"])


def test_non_finite_loss_raises_before_the_step():
  lrn, stream = _learner("ntkcl", "official", ())

  class Bad(ColourStream):
    def train_batches(self, task, epoch, batch_size, start_batch=0):
      for b in super().train_batches(task, epoch, batch_size, start_batch):
        b["image"] = b["image"] * np.inf
        yield b
  bad = Bad(lrn.config)
  rec = Recorder()
  with pytest.raises(learner_lib.NonFiniteLossError, match="task 0 epoch 0 step 0"):
    lrn.run(bad, lrn.init_state(jax.random.PRNGKey(0)), hooks=rec)
  assert not rec.steps
  assert issubclass(learner_lib.NonFiniteLossError, FloatingPointError)
  del stream


@pytest.mark.slow
def test_official_run_keeps_patch_mixing_at_zero_and_state_shapes_fixed():
  lrn, _, init, state, _, _ = _run()
  flat = tree_utils.flatten(state["params"]["patch"])
  for k, v in flat.items():
    if k.endswith("global_patch_prompt/kernel") or k.endswith("global_patch_prompt/bias") or \
        k.endswith("prompt_norm/scale"):
      assert np.abs(np.asarray(v)).max() == 0.0, k  # spec 1.3 fixed point
  assert max(np.abs(np.asarray(v)).max() for k, v in flat.items()
             if k.endswith("prompt_norm/bias")) > 0  # only LN beta trains
  abstract = jax.eval_shape(lrn.init_state, jax.random.PRNGKey(0))
  shapes = lambda t: {k: (v.shape, v.dtype) for k, v in _flat_state(t).items()}
  assert shapes(abstract) == shapes(state) == shapes(init)
  acc = np.asarray(state["acc"])
  assert np.isnan(acc[0, 1:]).all() and np.isfinite(np.diag(acc)).all()


@pytest.mark.slow
def test_fix_patch_init_trains_token_mixing():
  _, _, init, state, _, _ = _run("ntkcl", "corrected", tuple(ALL_FIXES.items()))
  k = "Transformer/encoderblock_1/prompt/global_patch_prompt/kernel"
  a = tree_utils.flatten(init["params"]["patch"])[k]
  b = tree_utils.flatten(state["params"]["patch"])[k]
  assert np.abs(np.asarray(a)).max() > 0 and np.abs(np.asarray(a - b)).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("method,variant,fixes", [
    ("ntkcl", "official", ()),
    ("ntkcl", "corrected", tuple(ALL_FIXES.items())),
    ("channel", "official", ()),
    ("patch", "official", ()),
    ("simplecil", "official", ()),
    ("seq_adapter", "official", ()),
])
def test_end_to_end_three_tasks_well_above_chance(method, variant, fixes):
  lrn, stream, _, state, history, rec = _run(method, variant, fixes)
  assert [h["task"] for h in history] == [0, 1, 2]
  chance = 100 / 6
  assert history[-1]["top1"] > 3 * chance, history[-1]
  for h in history:
    assert h["new_accuracy"] > 75, h  # each task's own 2 classes (chance 50%)
    assert len(h["per_task_accuracy"]) == h["task"] + 1
  expected_steps = 0 if method == "simplecil" else 3 * 2 * stream.num_train_batches(0, 8)
  assert len(rec.steps) == expected_steps
  if method == "ntkcl":
    assert set(history[0]["losses"]) >= {"ce_channel", "ce_patch", "ce_fused", "nce", "orth",
                                         "reg"}
  del lrn, state


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mid_task", "eval_phase"])
def test_resume_from_a_saved_position_is_bit_identical(which):
  lrn, stream, _, final, history, rec = _run()
  if which == "mid_task":
    pos, state, _ = next(s for s in rec.steps if s[0]["task"] == 1 and s[0]["epoch"] == 1
                         and s[0]["batch"] == 1)
  else:
    pos, state, _ = next(s for s in rec.steps if s[0]["task"] == 1 and s[0]["phase"] == "eval")
  resumed, hist2 = lrn.run(stream, state, position=pos, hooks=Recorder())
  _assert_trees_identical(_flat_state(resumed), _flat_state(final))
  assert hist2 == history[1:]


def test_old_pool_size_closed_forms():
  """fc.weight[:-increment] (official) vs earlier tasks only (fix_old_pool), spec 9 item 7."""
  size = learner_lib.old_pool_size
  assert int(size(0, 7, 5, False)) == 2    # Oxford Pets task 0: 2 zero rows
  assert int(size(0, 2, 2, False)) == 0    # init_cls == increment: none
  assert int(size(7, 5, 5, False)) == 7    # later tasks: the earlier classes
  assert int(size(0, 7, 5, True)) == 0
  assert int(size(12, 5, 5, True)) == 12


@pytest.mark.parametrize("fix", [False, True])
def test_nce_at_task0_with_init_cls_above_increment(fix):
  """init_cls 4, increment 2: the official NCE term at task 0 is the NCE of the fused features
  plus two zero prototypes labelled 0 and 1; with fix_old_pool it has no prototype rows."""
  from ntkcl_jax import losses
  from ntkcl_jax.models import ntkcl
  cfg = make_config("ntkcl", "corrected", fix_old_pool=fix, adapter_dropout=0.0,
                    fusion_dropout=0.0)
  cfg.data.num_classes, cfg.data.init_cls, cfg.data.increment = 6, 4, 2
  backbone = vit.init_params(train.vit_config(cfg), jax.random.PRNGKey(0))
  lrn = learner_lib.Learner(cfg, backbone, sharding.make_mesh())
  state = lrn._new_task(lrn.init_state(jax.random.PRNGKey(3)))
  rng = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rng.rand(8, 16, 16, 3), jnp.float32),
           "label": jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32),
           "mask": jnp.ones(8, bool)}
  keys = tuple(jax.random.split(jax.random.PRNGKey(5), 2))
  _, (terms, _) = lrn._loss(state["params"], state, lrn.backbone, batch, keys, jnp.int32(0),
                            jnp.int32(4))
  trainable = {k: v for k, v in state["params"].items() if k != "proxy"}
  fused = ntkcl.features(lrn.spec, lrn.backbone, trainable, state["frozen"], batch["image"],
                         train=False)["fused"]
  if fix:
    z, y = fused, batch["label"]
  else:
    assert not np.any(np.asarray(state["prototypes"][:2]))  # untouched rows are zeros
    z = jnp.concatenate([fused, jnp.zeros((2, fused.shape[1]))])
    y = jnp.concatenate([batch["label"], jnp.asarray([0, 1], jnp.int32)])
  want, _ = losses.nce(z, y, jnp.ones(len(y), bool), cfg.method.nce_tau)
  np.testing.assert_allclose(float(terms["nce"]), -float(want), rtol=1e-5, atol=1e-5)


def test_configs_saved_before_a_switch_existed_still_load_and_resume():
  """A run saved before fix_old_pool existed: its switches read as off, and its config compares
  equal to today's for resuming (train._comparable)."""
  new = make_config("ntkcl", "corrected")
  old = new.to_dict()
  del old["method"]["fix_old_pool"]
  import ml_collections
  assert learner_lib.method_flags(ml_collections.ConfigDict(old))["fix_old_pool"] is False
  as_json = lambda c: __import__("json").loads(__import__("json").dumps(c, default=list))  # noqa: E731
  assert train._comparable(as_json(old)) == train._comparable(as_json(new.to_dict()))
  on = new.to_dict()
  on["method"]["fix_old_pool"] = True
  assert train._comparable(as_json(old)) != train._comparable(as_json(on))
