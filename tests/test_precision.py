"""The compute policy of the `model` config section (docs/design.md, "Precision, fused attention
and remat"): the keys reach the ViT and every PEFT layer; every matmul of the model and the losses
runs at `matmul_precision`; fused attention equals the einsum path; remat changes nothing bit for
bit; a bfloat16 run computes in bf16, keeps parameters and optimiser state float32 and reaches the
float32 run's accuracies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import switches
from ntkcl_jax import config_files, learner as learner_lib, sharding, train, tree_utils
from ntkcl_jax.checkpoints import runs
from ntkcl_jax.models import ntkcl, peft, vit
import _jaxpr  # tests/_jaxpr.py

pytestmark = pytest.mark.filterwarnings("ignore")

LO, N_NEW = 2, 2  # task 1 of the tiny 3 x 2 split: the NCE and orth terms see old prototypes


def tiny_config(**model):
  """configs/tiny.py, corrected variant with every switch on (so every trainable leaf, including
  the fusion's query/key, has a gradient), one device, with `model` keys set."""
  c = config_files.load_config_file("configs/tiny.py")
  c.method.variant = "corrected"
  for s in switches.NAMES:
    c.method[s] = True
  c.train.mesh_data = 1
  c.model.update(model)
  return c


_BACKBONE = {}


def make_learner(**model):
  """A Learner on one device over ONE shared random backbone (the compute policy never changes
  the parameter tree, so every variant can use the float32 einsum model's parameters)."""
  cfg = tiny_config(**model)
  if not _BACKBONE:
    _BACKBONE["p"] = vit.init_params(ntkcl.vit_config(tiny_config()), jax.random.PRNGKey(0))
  return learner_lib.Learner(cfg, _BACKBONE["p"], sharding.make_mesh(devices=jax.devices()[:1]))


def task1_state(lrn):
  """A mid-run state: random prototypes of task 0's classes, the orth basis from them, and
  random perturbations of the trainable leaves (zero-initialised up_proj / fusion would hide
  gradients)."""
  state = lrn.init_state(jax.random.PRNGKey(1))
  protos = state["prototypes"].at[:LO].set(
      jax.random.normal(jax.random.PRNGKey(2), (LO, state["prototypes"].shape[1])))
  state = lrn._new_task(dict(state, prototypes=protos))  # pylint: disable=protected-access
  leaves, tree = jax.tree_util.tree_flatten(state["params"])
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = tree.unflatten([l + 0.05 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  return dict(state, params=params)


def batch(n=8):
  rng = np.random.RandomState(0)
  return {"image": jnp.asarray(rng.rand(n, 16, 16, 3), jnp.float32),
          "label": jnp.asarray(rng.randint(LO, LO + N_NEW, n), jnp.int32),
          "mask": jnp.arange(n) < n - 1}  # one padded row


def step_args(lrn, state, b):
  """The arguments of `Learner.step_given` (one SGD step, fixed dropout key and NCE rows)."""
  k_drop, k_rows = jax.random.split(jax.random.PRNGKey(4))
  rows = lrn.nce_rows(k_rows, jnp.int32(LO), jnp.int32(N_NEW))
  return state, lrn.backbone, b, jnp.float32(0.1), jnp.int32(LO), jnp.int32(N_NEW), rows, k_drop


def features_loss_grad(lrn, state, b):
  """(eval features, total loss, loss terms, gradient w.r.t. the params) of the learner's loss
  in training mode (dropout on, fixed keys)."""
  *_, rows, k_drop = step_args(lrn, state, b)

  def loss(p):
    with ntkcl.matmul_precision(lrn.spec):
      return lrn._loss(  # pylint: disable=protected-access
          p, state, lrn.backbone, b, k_drop, rows, jnp.int32(LO), jnp.int32(N_NEW))
  (total, (terms, _)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(state["params"])
  f = ntkcl.features_jit(lrn.spec, lrn.backbone, lrn.trainable(state), state["frozen"],
                         b["image"], train=False)
  return f, total, terms, g


def float_leaves(tree):
  """{path: leaf} of the floating-point leaves of any pytree (optax states included)."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


def dot_generals(jaxpr):
  """Every dot_general equation of a jaxpr, inside nested jaxprs (jit, vmap, remat, ...) too."""
  return _jaxpr.equations(jaxpr, ("dot_general",))


# ------------------------------------------------------------------------------------------------
# Config keys
# ------------------------------------------------------------------------------------------------
def test_config_keys_reach_the_vit_and_every_peft_layer():
  cfg = tiny_config(dtype="bfloat16", matmul_precision="high", attention="fused", remat=True)
  spec = ntkcl.spec_from_config(cfg)
  assert (spec.vit.dtype, spec.vit.matmul_precision, spec.vit.attention, spec.vit.remat) == (
      jnp.bfloat16, "high", "fused", True)
  assert spec.channel_factory()().dtype == jnp.bfloat16
  assert spec.patch_factory()().dtype == jnp.bfloat16
  for fusion in peft.FUSIONS:
    cfg.method.fusion = fusion
    assert ntkcl.spec_from_config(cfg).fusion_module().dtype == jnp.bfloat16
  # the defaults: float32, 'highest', einsum, no remat
  d = ntkcl.vit_config(config_files.load_config_file(
      "configs/base.py"))
  assert (d.dtype, d.matmul_precision, d.attention, d.remat) == (
      jnp.float32, "highest", "einsum", False)


@pytest.mark.parametrize("key, value, match", [
    ("dtype", "float16", "model.dtype"),
    ("matmul_precision", "fastest", "matmul_precision"),
    ("attention", "flash", "attention"),
])
def test_bad_policy_values_are_clear_errors(key, value, match):
  with pytest.raises(ValueError, match=match):
    ntkcl.vit_config(tiny_config(**{key: value}))


def test_policy_keys_are_not_shape_overrides():
  cfg = tiny_config()
  cfg.model.overrides.dtype = "bfloat16"
  with pytest.raises(ValueError, match="set model.dtype instead"):
    ntkcl.vit_config(cfg)
  # on the command line the keys are model.*, which the launcher accepts
  c = config_files.load("configs/tiny.py", ["--config.model.dtype=bfloat16",
                                             "--config.model.remat=True",
                                             "--config.model.attention=fused",
                                             "--config.model.matmul_precision=high"])
  assert (c.model.dtype, c.model.remat, c.model.attention) == ("bfloat16", True, "fused")


# ------------------------------------------------------------------------------------------------
# Matmul precision
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, expect", [
    ("highest", jax.lax.Precision.HIGHEST),
    ("tensorfloat32", jax.lax.Precision.HIGH),
    ("bfloat16", jax.lax.Precision.DEFAULT),
])
def test_every_matmul_of_model_and_losses_runs_at_the_configured_precision(setting, expect):
  """All dot_generals the jitted pieces trace (ViT, PEFT, fusion, losses, backward pass,
  prototypes, evaluation logits) carry the precision of model.matmul_precision, not JAX's
  default (None), whatever the surrounding context says."""
  lrn = make_learner(matmul_precision=setting)
  state, b = task1_state(lrn), batch()
  # pylint: disable=protected-access
  pieces = {
      "train step": (lrn.step_given, step_args(lrn, state, b)),
      "prototype sums": (lrn._proto_sums, (state, lrn.backbone, b)),
      "evaluation": (lrn._eval, (state, lrn.backbone, b, jnp.int32(LO + N_NEW))),
      "task start": (lrn._new_task, (state,)),
  }
  with jax.default_matmul_precision("float32" if setting != "highest" else "default"):
    for name, (fn, args) in pieces.items():
      dots = dot_generals(jax.make_jaxpr(fn)(*args).jaxpr)
      got = {eqn.params["precision"] for eqn in dots}
      assert got <= {(expect, expect)}, (name, got)
      if name == "train step":  # forward + backward of 3 branches x 2 blocks and the losses
        assert len(dots) > 50, len(dots)


# ------------------------------------------------------------------------------------------------
# Fused attention and remat
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
  """The float32 einsum / no-remat learner's state, batch and (features, loss, terms, grad)."""
  lrn = make_learner()
  state, b = task1_state(lrn), batch()
  return state, b, features_loss_grad(lrn, state, b)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_fused_attention_equals_einsum_attention(reference):
  """jax.nn.dot_product_attention scales the logits instead of q and may fuse differently: the
  same function up to float32 rounding (1e-5 relative to each tensor's largest entry)."""
  state, b, (f0, loss0, terms0, g0) = reference
  f1, loss1, terms1, g1 = features_loss_grad(make_learner(attention="fused"), state, b)
  for k in f0:
    assert _rel(f1[k], f0[k]) < 1e-5, k
  assert _rel(loss1, loss0) < 1e-5
  for k in terms0:
    np.testing.assert_allclose(terms1[k], terms0[k], rtol=1e-5, atol=1e-6, err_msg=k)
  flat0, flat1 = tree_utils.flatten(g0), tree_utils.flatten(g1)
  assert flat0.keys() == flat1.keys()
  for k in flat0:
    assert np.any(np.asarray(flat0[k])), f"{k}: zero gradient, the comparison would be empty"
    assert _rel(flat1[k], flat0[k]) < 1e-5, k


@pytest.mark.parametrize("hook", ["mlp_adapter", "token_hook"])
def test_remat_changes_nothing_bit_for_bit(hook):
  """The ViT with each PEFT extension point, dropout on: with remat the features and the jitted
  gradient w.r.t. every parameter are bit-identical (the recomputed forward is the same
  function, with the same dropout masks; `deterministic` stays static)."""
  def run(remat):
    cfg = vit.get_config("tiny", image_size=8, patch_size=4, hidden_size=16, num_layers=2,
                         num_heads=2, mlp_dim=32, remat=remat)
    module = peft.ChannelAdapter if hook == "mlp_adapter" else peft.PatchPrompt
    model = vit.ViT(cfg, **{hook: module})
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)  # non-zero PEFT init: every leaf has grad
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = tree.unflatten([l + 0.1 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
    apply = lambda p: model.apply({"params": p}, x, deterministic=False,
                                  rngs={"dropout": jax.random.PRNGKey(2)})
    feats = jax.jit(apply)(params)
    return feats, jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(params)
  (f0, g0), (f1, g1) = run(False), run(True)
  np.testing.assert_array_equal(np.asarray(f1), np.asarray(f0))
  flat0, flat1 = tree_utils.flatten(g0), tree_utils.flatten(g1)
  assert flat0.keys() == flat1.keys()  # the remat-wrapped blocks keep their parameter names
  for k in flat0:
    np.testing.assert_array_equal(np.asarray(flat1[k]), np.asarray(flat0[k]), err_msg=k)


def test_remat_full_ntkcl_loss(reference):
  """The whole NTK-CL model and loss (three branches, vmapped prompt sets, fusion, all terms):
  features and loss bit-identical; gradients equal to float32 rounding. They are not bitwise
  here: XLA:CPU fuses the recomputed forward of the vmapped block into the backward pass
  differently, so a few sums round differently (measured: only block 0's PEFT leaves, max
  1.3e-5 relative on the 2-element prompt bias, a sum with cancellation; ~3e-7 elsewhere;
  eagerly, op by op, the gradients are bit-identical). Bound: 1e-4 relative to each leaf's
  largest entry; a wrong recomputation (other dropout masks, another block) is O(1)."""
  state, b, (f0, loss0, _, g0) = reference
  f1, loss1, _, g1 = features_loss_grad(make_learner(remat=True), state, b)
  for k in f0:
    np.testing.assert_array_equal(np.asarray(f1[k]), np.asarray(f0[k]), err_msg=k)
  assert float(loss1) == float(loss0)
  flat0, flat1 = tree_utils.flatten(g0), tree_utils.flatten(g1)
  assert flat0.keys() == flat1.keys()
  for k in flat0:
    assert _rel(flat1[k], flat0[k]) < 1e-4, k


def test_remat_recomputes_blocks_in_the_backward_pass():
  """The remat gradient really is rematerialised: its jaxpr holds one checkpoint per block and
  branch pass (otherwise the bit-identity above would be trivial)."""
  def count(lrn):
    state, b = task1_state(lrn), batch()
    jaxpr = jax.make_jaxpr(lrn.step_given)(*step_args(lrn, state, b))
    return str(jaxpr).count("checkpoint[") + str(jaxpr).count("remat")
  assert count(make_learner()) == 0
  assert count(make_learner(remat=True)) > 0


# ------------------------------------------------------------------------------------------------
# bfloat16
# ------------------------------------------------------------------------------------------------
def test_bf16_features_compute_in_bf16_and_return_float32():
  lrn = make_learner(dtype="bfloat16")
  state, b = task1_state(lrn), batch()
  fn = lambda st: ntkcl.features(lrn.spec, lrn.backbone, lrn.trainable(st), st["frozen"],
                                 b["image"], train=True, rng=jax.random.PRNGKey(0))
  closed = jax.make_jaxpr(fn)(state)
  dots = dot_generals(closed.jaxpr)
  assert len(dots) > 20
  # every matmul of the ViT, the adapters, prompts and fusion takes bf16 operands
  assert {(e.invars[0].aval.dtype, e.invars[1].aval.dtype) for e in dots} == {
      (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))}
  assert {a.dtype for a in closed.out_avals} == {jnp.dtype(jnp.float32)}
  # the step: parameters, optimiser state, prototypes and every loss term stay float32
  out_state, loss, metrics = jax.eval_shape(lrn.step_given, *step_args(lrn, state, b))
  leaves = float_leaves({"params": out_state["params"], "opt": out_state["opt"]})
  assert len(leaves) > 10
  for path, leaf in leaves.items():
    assert leaf.dtype == jnp.float32, path
  assert loss.dtype == jnp.float32
  assert {m.dtype for m in jax.tree_util.tree_leaves(metrics)} == {jnp.dtype(jnp.float32)}


@pytest.fixture(scope="module")
def runs_f32_bf16(tmp_path_factory):
  """The tiny config's run in float32 and in bfloat16 (results, final state of each)."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg = config_files.load_config_file("configs/tiny.py")
    cfg.model.dtype = dtype
    cfg.train.update(mesh_data=1, checkpoint_every_steps=0, keep_checkpoints=1)
    wd = str(tmp_path_factory.mktemp(dtype))
    res = train.run(cfg, wd, progress=False)
    _, _, state, _ = runs.load_run(wd)
    out[dtype] = res, state
  return out


@pytest.mark.slow
def test_bf16_run_matches_float32_run(runs_f32_bf16):
  """Tolerance: 6.25 accuracy points per entry of the accuracy matrix = ONE of the 16 test images
  of a task (8 per class x 2 classes). bf16 features carry ~3 significant digits (8-bit
  mantissa), so an image near a decision boundary may flip, but a healthy bf16 path cannot move
  more than that on this separable synthetic stream (both runs measure ~94-100%); a broken one
  (garbage features, or bf16 parameter updates lost to rounding) falls towards chance (1/6 to 1/2
  of the seen classes) and fails. The mean losses of each task agree to 1% (measured ~1e-4:
  the losses themselves run in float32 on the bf16-rounded features)."""
  (r32, s32), (r16, s16) = runs_f32_bf16["float32"], runs_f32_bf16["bfloat16"]
  a32 = np.array(r32["accuracy_matrix"], np.float64)
  a16 = np.array(r16["accuracy_matrix"], np.float64)
  assert np.array_equal(np.isnan(a32), np.isnan(a16))
  lower = ~np.isnan(a32)
  assert np.nanmin(a32) >= 75, a32  # the float32 run learned (so the comparison means something)
  np.testing.assert_allclose(a16[lower], a32[lower], atol=6.25)
  for t, (l32, l16) in enumerate(zip(r32["losses"], r16["losses"])):
    assert l16["loss"] == pytest.approx(l32["loss"], rel=1e-2), t
  # parameters, optimiser state, frozen sets and prototypes of the bf16 run are float32
  for s in (s32, s16):
    for path, leaf in float_leaves({k: s[k] for k in ("params", "opt", "frozen",
                                                      "prototypes")}).items():
      assert leaf.dtype == jnp.float32, path
  # and the bf16 run really was different arithmetic (otherwise the test would be vacuous)
  assert r16["losses"][-1]["loss"] != r32["losses"][-1]["loss"]
