"""The mesh helpers: a data-parallel and a 2x4 tensor-parallel jitted step equal one device."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkcl_jax import sharding as sh


def _step(params, opt_state, batch, tx):
  def loss(p):
    h = jnp.tanh(batch["x"] @ p["w1"])
    return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)
  l, g = jax.value_and_grad(loss)(params)
  upd, opt_state = tx.update(g, opt_state, params)
  return optax.apply_updates(params, upd), opt_state, l


@pytest.mark.parametrize("shape", [(8, 1), (2, 4)])
def test_sharded_steps_equal_single_device(shape):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 32)).astype(np.float32) * 0.3,
            "w2": rng.normal(size=(32, 4)).astype(np.float32) * 0.3}
  batch = {"x": rng.normal(size=(16, 16)).astype(np.float32),
           "y": rng.normal(size=(16, 4)).astype(np.float32)}
  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))

  ref_p, ref_o = params, tx.init(params)
  step1 = jax.jit(lambda p, o, b: _step(p, o, b, tx))
  for _ in range(3):
    ref_p, ref_o, ref_l = step1(ref_p, ref_o, batch)

  mesh = sh.make_mesh(*shape)
  p_sh = sh.param_shardings(params, mesh, min_model_size=1)
  p = sh.put(params, p_sh)
  o = sh.put_replicated(tx.init(params), mesh)
  o_sh = jax.tree_util.tree_map(lambda x: x.sharding, o)
  step = jax.jit(lambda p, o, b: _step(p, o, b, tx),
                 in_shardings=(p_sh, o_sh, sh.batch_sharding(mesh)),
                 out_shardings=(p_sh, o_sh, sh.replicated(mesh)), donate_argnums=(0, 1))
  b = sh.global_batch(batch, mesh)
  for _ in range(3):
    p, o, l = step(p, o, b)
  if shape[1] > 1:
    assert p["w1"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  np.testing.assert_allclose(l, ref_l, rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(p[k], ref_p[k], atol=1e-5)


def test_mesh_errors_say_what_to_change():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sh.make_mesh(3, 2)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sh.check_batch_divisible(12, sh.make_mesh())
