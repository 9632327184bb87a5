"""The NTK-CL learner's jitted pieces: EMA closed forms, masking, fixed state shapes, patch fixed
point, NCE pool; and end-to-end accuracy of every method/variant through the launcher (the real
data stream on separable synthetic class templates)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import switches
from ntkcl_jax.configs import base
from ntkcl_jax import data
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import losses
from ntkcl_jax import sharding
from ntkcl_jax import train
from ntkcl_jax import tree_utils
from ntkcl_jax.checkpoints import runs
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit

ALL_FIXES = {s: True for s in switches.NAMES}


def make_config(method="ntkcl", variant="official", **method_fields):
  c = base.get_config()
  c.model.name, c.model.image_size = "tiny", 16
  c.model.overrides.update(dict(patch_size=4, num_layers=2, hidden_size=32, num_heads=2,
                                mlp_dim=64))
  c.data.num_classes, c.data.init_cls, c.data.increment = 6, 2, 2
  c.data.name = c.data.source = "synthetic"
  c.data.max_per_class_train, c.data.max_per_class_test = 12, 8
  c.data.train_transform = "none"
  c.optim.update(dict(epochs=2, batch_size=8, eval_batch_size=16, lr=0.05))
  c.method.name, c.method.variant = method, variant
  c.method.update(method_fields)
  c.topk = 2
  return c


@functools.lru_cache(maxsize=None)
def _learner(method, variant, fixes):
  cfg = make_config(method, variant, **dict(fixes))
  mesh = sharding.make_mesh()
  backbone = vit.init_params(ntkcl.vit_config(cfg), jax.random.PRNGKey(0))
  return learner_lib.Learner(cfg, backbone, mesh), data.build_stream(cfg)


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
  """run_of(method, variant, fixes) -> (learner, results, metrics.jsonl records, final state) of
  a whole run through the launcher (each configuration trained once per module)."""
  cache = {}

  def get(method="ntkcl", variant="official", fixes=()):
    if (method, variant, fixes) not in cache:
      cfg = make_config(method, variant, **dict(fixes))
      cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints = 0, 1
      cfg.train.log_every_steps = 1  # a metrics line per step
      wd = tmp_path_factory.mktemp(f"{method}_{variant}")
      res = train.run(cfg, str(wd), progress=False)
      with open(wd / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
      _, lrn, state, _ = runs.load_run(str(wd))
      cache[method, variant, fixes] = lrn, res, lines, state
    return cache[method, variant, fixes]
  return get


def _assert_trees_identical(a, b):
  fa, fb = tree_utils.flatten(a), tree_utils.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _flat_state(state):
  return {"/".join(map(str, p)): v for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_switches_official_forces_all_off():
  cfg = make_config(variant="official", **ALL_FIXES)
  assert switches.from_config(cfg) == switches.Switches()
  assert not any(vars(switches.from_config(cfg)).values())
  cfg.method.variant = "corrected"
  assert all(vars(switches.from_config(cfg)).values())
  assert ntkcl.spec_from_config(cfg).switches == switches.from_config(cfg)
  cfg.method.fix_orth = False
  assert not switches.from_config(cfg).fix_orth and switches.from_config(cfg).fix_ema
  cfg.method.variant = "fixed"
  with pytest.raises(ValueError, match="official"):
    switches.from_config(cfg)


@pytest.mark.parametrize("mode", ["official", "fix_ema", "copy"])
def test_frozen_sets_follow_closed_form_after_t_tasks(mode):
  """docs/method.md §3.4: running mean of end-of-task values (official), copy-then-EMA (fix_ema),
  or the last task's values (frozen_update='copy', the EMA ablation)."""
  fixes = {"official": (), "fix_ema": (("fix_ema", True), ("ema_decay", 0.7)),
           "copy": (("frozen_update", "copy"),)}[mode]
  fix_ema = mode == "fix_ema"
  lrn, _ = _learner("ntkcl", "corrected", fixes)
  state = lrn.init_state(jax.random.PRNGKey(3))
  ends = [jax.tree_util.tree_map(lambda x, s=s: x + float(s + 1), state["params"]["channel"])
          for s in range(4)]
  for t, cur in enumerate(ends):
    state = lrn._ema(dict(state, params=dict(state["params"], channel=cur)), jnp.int32(t))
  if mode == "copy":
    want = ends[-1]
  elif fix_ema:
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
  other["image"][5:] = 255 - other["image"][5:]  # uint8, as the stream sends them
  other["label"][5:] = 1 - other["label"][5:]
  # the step donates its state: each call gets its own copy
  outs = [lrn._step(jax.tree_util.tree_map(jnp.copy, state), lrn.backbone,
                    sharding.global_batch(b, lrn.mesh), jnp.float32(0.05), jnp.int32(0),
                    jnp.int32(2), jnp.bool_(True)) for b in (batch, other)]
  assert not np.array_equal(batch["image"], other["image"])
  np.testing.assert_array_equal(outs[0][1]["loss"], outs[1][1]["loss"])
  _assert_trees_identical(outs[0][0]["params"], outs[1][0]["params"])


@pytest.mark.slow
def test_official_run_keeps_patch_mixing_at_zero_and_state_shapes_fixed(run_of):
  lrn, res, _, state = run_of()
  init = lrn.init_state(jax.random.PRNGKey(lrn.config.seed))
  flat = tree_utils.flatten(state["params"]["patch"])
  for k, v in flat.items():
    if k.endswith("global_patch_prompt/kernel") or k.endswith("global_patch_prompt/bias") or \
        k.endswith("prompt_norm/scale"):
      assert np.abs(np.asarray(v)).max() == 0.0, k  # docs/method.md §1.3 fixed point
  assert max(np.abs(np.asarray(v)).max() for k, v in flat.items()
             if k.endswith("prompt_norm/bias")) > 0  # only LN beta trains
  abstract = jax.eval_shape(lrn.init_state, jax.random.PRNGKey(0))
  shapes = lambda t: {k: (v.shape, v.dtype) for k, v in _flat_state(t).items()}  # noqa: E731
  assert shapes(abstract) == shapes(state) == shapes(init)
  acc = np.asarray(state["acc"])
  assert np.isnan(acc[np.triu_indices(3, 1)]).all() and np.isfinite(np.diag(acc)).all()
  # the state's accuracy matrix is the one results.json reports
  np.testing.assert_array_equal(np.nan_to_num(acc, nan=-1), np.nan_to_num(np.array(
      res["accuracy_matrix"], np.float64).astype(np.float32), nan=-1))


@pytest.mark.slow
def test_fix_patch_init_trains_token_mixing(run_of):
  lrn, _, _, state = run_of("ntkcl", "corrected", tuple(ALL_FIXES.items()))
  init = lrn.init_state(jax.random.PRNGKey(lrn.config.seed))
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
def test_end_to_end_three_tasks_well_above_chance(run_of, method, variant, fixes):
  _, res, lines, _ = run_of(method, variant, fixes)
  ends = [line for line in lines if line["event"] == "task_end"]
  assert [e["task"] for e in ends] == [0, 1, 2]
  chance = 100 / 6
  assert res["last_accuracy"] > 3 * chance, res["accuracy_per_step"]
  for e in ends:
    assert e["new"] > 75, e  # each task's own 2 classes (chance 50%)
    assert len(e["per_task"]) == e["task"] + 1
  expected_steps = 0 if method == "simplecil" else 3 * 2 * 3  # tasks x epochs x batches
  assert sum(line["event"] == "step" for line in lines) == expected_steps
  if method == "ntkcl":
    assert set(res["losses"][0]) >= {"ce_channel", "ce_patch", "ce_fused", "nce", "orth", "reg"}
  oracle = res["oracle_prototypes"]  # every seen class's prototype recomputed at the end
  assert oracle["task"] == 2 and len(oracle["per_task"]) == 3
  if method == "simplecil":  # frozen features: the recomputed prototypes are the same ones
    assert oracle["per_task"] == res["accuracy_matrix"][-1]
    assert oracle["top1"] == res["last_accuracy"]


def test_old_pool_size_closed_forms():
  """fc.weight[:-increment] (official) vs earlier tasks only (fix_old_pool), docs/method.md §9 item 7."""
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
  cfg = make_config("ntkcl", "corrected", fix_old_pool=fix, adapter_dropout=0.0,
                    fusion_dropout=0.0)
  cfg.data.num_classes, cfg.data.init_cls, cfg.data.increment = 6, 4, 2
  backbone = vit.init_params(ntkcl.vit_config(cfg), jax.random.PRNGKey(0))
  lrn = learner_lib.Learner(cfg, backbone, sharding.make_mesh())
  state = lrn._new_task(lrn.init_state(jax.random.PRNGKey(3)))
  rng = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rng.rand(8, 16, 16, 3), jnp.float32),
           "label": jnp.asarray([0, 0, 1, 1, 2, 2, 3, 3], jnp.int32),
           "mask": jnp.ones(8, bool)}
  k_drop, k_rows = jax.random.split(jax.random.PRNGKey(5), 2)
  rows = lrn.nce_rows(k_rows, jnp.int32(0), jnp.int32(4))
  _, (terms, _) = lrn._loss(state["params"], state, lrn.backbone, batch, k_drop, rows,
                            jnp.int32(0), jnp.int32(4))
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
