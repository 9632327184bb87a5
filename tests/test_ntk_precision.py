"""The NTK analysis computes in float32 whatever the run trained in: runs.load_run rebuilds the
learner of a bfloat16 run in float32 at matmul precision 'highest' (compute='float32', the
default) or in the run's own policy (compute='run'), from the same saved float32 state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_analysis import kernels, readouts
from ntkcl_jax import config_files, train
from ntkcl_jax.checkpoints import runs
import _jaxpr  # tests/_jaxpr.py

MATMULS = ("dot_general", "conv_general_dilated")


@pytest.fixture(scope="module")
def bf16_workdir(tmp_path_factory):
  """A tiny run trained in bfloat16 with fused attention and remat (2 tasks, 1 epoch)."""
  cfg = config_files.load_config_file("configs/tiny.py")
  cfg.model.update(dtype="bfloat16", attention="fused", remat=True, matmul_precision="default")
  cfg.optim.epochs = 1
  cfg.data.tasks_to_run = 2
  cfg.train.update(mesh_data=1, checkpoint_every_steps=0, keep_checkpoints=1)
  wd = str(tmp_path_factory.mktemp("bf16run"))
  train.run(cfg, wd, progress=False)
  return wd


def matmuls(jaxpr) -> list:
  """Every dot_general / conv equation of a jaxpr, nested jaxprs (jit, vmap, remat) included."""
  return _jaxpr.equations(jaxpr, MATMULS)


def takes_bf16(eqn) -> bool:
  return any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.invars)


def readout_jaxpr(learner, state, x):
  """The jaxpr of the fused-view feature sketch (4 probes) of a learner state on images x."""
  f, params = readouts.model_readout(learner, state, "fused",
                                     readouts.probes(learner.spec.feature_dim, 4, 0))
  return f, params, jax.make_jaxpr(f)(params, x).jaxpr


def float_leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(jnp.result_type(l), jnp.floating)}


def test_readout_of_a_bf16_run_is_float32_by_default_and_bf16_on_request(bf16_workdir):
  cfg32, lrn32, st32, meta32 = runs.load_run(bf16_workdir)
  cfg_run, lrn_run, st_run, meta_run = runs.load_run(bf16_workdir, compute="run")
  assert meta32["compute"] == "float32" and meta_run["compute"] == "run"
  assert meta32["run_compute"] == meta_run["run_compute"] == {
      "dtype": "bfloat16", "matmul_precision": "default", "attention": "fused", "remat": True}
  assert (cfg32.model.dtype, cfg32.model.matmul_precision, cfg32.model.attention,
          cfg32.model.remat) == ("float32", "highest", "einsum", False)
  assert (cfg_run.model.dtype, cfg_run.model.attention) == ("bfloat16", "fused")
  assert lrn32.spec.vit.dtype == jnp.float32 and lrn_run.spec.vit.dtype == jnp.bfloat16
  # the saved state and the backbone are float32 and the same under either policy
  for a, b in ((st32, st_run), (lrn32.backbone, lrn_run.backbone)):
    fa, fb = float_leaves(a), float_leaves(b)
    assert fa.keys() == fb.keys() and fa
    for k in fa:
      assert fa[k].dtype == jnp.float32, k
      np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)

  x = np.random.RandomState(0).rand(2, 16, 16, 3).astype(np.float32)
  f32, p32, jx32 = readout_jaxpr(lrn32, st32, x)
  f_run, p_run, jx_run = readout_jaxpr(lrn_run, st_run, x)
  ops32, ops_run = matmuls(jx32), matmuls(jx_run)
  assert len(ops32) > 20 and len(ops_run) > 20
  assert not [e for e in ops32 if takes_bf16(e)]
  assert sum(takes_bf16(e) for e in ops_run) > len(ops_run) // 2
  highest = jax.lax.Precision.HIGHEST
  assert all(e.params["precision"] == (highest, highest) for e in ops32
             if e.primitive.name == "dot_general")
  # and so are the Jacobian calls the kernel compiles (the backward pass too)
  jac = jax.make_jaxpr(jax.jacrev(f32))(p32, x).jaxpr
  assert not [e for e in matmuls(jac) if takes_bf16(e)]
  assert [e for e in matmuls(jax.make_jaxpr(jax.jacrev(f_run))(p_run, x).jaxpr)
          if takes_bf16(e)]
  k32 = kernels.empirical_ntk(f32, p32, x)
  k_run = kernels.empirical_ntk(f_run, p_run, x)
  assert k32.dtype == np.float64 and np.all(np.isfinite(k32))
  np.testing.assert_allclose(k_run, k32, rtol=0.2)  # bf16 carries ~3 digits


def test_compute_option_is_checked(bf16_workdir):
  with pytest.raises(ValueError, match="compute='bfloat16'"):
    runs.load_run(bf16_workdir, compute="bfloat16")
