"""neural-tangents as an oracle (docs/ntk_theory.md §5: T7, T12): its analytic stax
kernels, its four empirical implementations, its predict normalisation and nt.batch tiling.
neural-tangents is importable on the pinned stack: these tests fail, never skip, without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _ntk_models
from ntk_analysis import kernels, linearized, nt_compat


@pytest.fixture(scope="module")
def tiny_vit_adapter():
  make_f, peft, x = _ntk_models.tiny_vit_adapter()
  return make_f(), peft, x[:4]


def mlp(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _mlp_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w1": jax.random.normal(k1, (3, 16)), "w2": jax.random.normal(k2, (16, 2)) / 4}


def test_import_reports_the_jax_version_problem_clearly(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "99.0")
  with pytest.raises(ImportError, match="supports jax"):
    nt_compat.import_neural_tangents()


def test_t7_wide_relu_mlp_converges_to_the_analytic_ntk():
  nt = nt_compat.import_neural_tangents()
  stax = nt.stax
  x = np.random.RandomState(0).randn(8, 6).astype(np.float32)
  errs = {}
  for width in (64, 1024):
    init, apply, kernel_fn = stax.serial(stax.Dense(width), stax.Relu(), stax.Dense(width),
                                         stax.Relu(), stax.Dense(1))
    analytic = np.asarray(kernel_fn(x, None, "ntk"))
    e = []
    for seed in range(3):
      _, params = init(jax.random.PRNGKey(seed), x.shape)
      emp = kernels.empirical_ntk(apply, params, x)
      e.append(np.linalg.norm(emp - analytic) / np.linalg.norm(analytic))
    errs[width] = np.mean(e)
  print("T7 mean relative Frobenius error vs stax:", errs)
  assert errs[1024] < 0.12 and errs[1024] < errs[64], errs
  # and our own arc-cosine recursion (Jacot et al. 2018) equals stax's analytic kernel
  # (stax computes in float32: arccos near cos = 1 costs it ~1e-4 on the diagonal)
  np.testing.assert_allclose(arccos_ntk(x, depth=2), analytic, rtol=1e-3, atol=1e-5)


def arccos_ntk(x, depth):
  """NTK of Dense-ReLU networks in NTK parameterisation (W_std=1, b_std=0), closed form."""
  x = np.asarray(x, np.float64)
  sigma = x @ x.T / x.shape[1]
  theta = sigma.copy()
  for _ in range(depth):
    d = np.sqrt(np.diag(sigma))
    cos = np.clip(sigma / np.outer(d, d), -1, 1)
    ang = np.arccos(cos)
    new_sigma = np.outer(d, d) * (np.sin(ang) + (np.pi - ang) * cos) / (2 * np.pi)
    dot = (np.pi - ang) / (2 * np.pi)
    theta = new_sigma + theta * dot
    sigma = new_sigma
  return theta



@pytest.mark.parametrize("impl", [1, 2, 3, 0])
def test_t12_neural_tangents_implementations_agree_with_ours(tiny_vit_adapter, impl):
  f, p, x = tiny_vit_adapter
  ours = kernels.empirical_ntk(f, p, x[:2], x[2:])
  theirs = kernels.empirical_ntk(f, p, x[:2], x[2:], backend="neural_tangents",
                                 implementation=impl)
  err = np.abs(ours - theirs).max() / np.abs(ours).max()
  print(f"neural-tangents implementation {impl} vs ours: max relative diff {err:.1e}")
  assert err < 1e-5


@pytest.mark.parametrize("impl", [1, 2, 3, 0])
def test_t12_full_kernels_agree_on_an_mlp(impl):
  p = _mlp_params()
  x = np.random.RandomState(0).randn(5, 3).astype(np.float32)
  ours = kernels.empirical_ntk(mlp, p, x, trace=False)
  theirs = nt_compat.empirical_ntk(mlp, p, x, None, trace=False, implementation=impl)
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


def test_t12_predict_gradient_descent_mse_normalisation():
  nt = nt_compat.import_neural_tangents()
  rng = np.random.RandomState(0)
  a = rng.randn(6, 6)
  k, kx = a @ a.T / 6, rng.randn(3, 6) / 3
  y, f0, f0t = rng.randn(6, 2), rng.randn(6, 2), rng.randn(3, 2)
  predict = nt.predict.gradient_descent_mse(k, y, learning_rate=0.7)
  tr_nt, te_nt = predict(5.0, f0, f0t, kx)
  tr, te = linearized.gd_mse_continuous(k, kx, y, f0, f0t, eta=0.7, time=5.0)
  np.testing.assert_allclose(tr, tr_nt, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(te, te_nt, rtol=1e-4, atol=1e-5)


def test_t12_nt_batch_tiling_equals_our_chunking():
  nt = nt_compat.import_neural_tangents()
  p = _mlp_params()
  x = np.random.RandomState(1).randn(8, 3).astype(np.float32)
  fn = nt.batch(nt.empirical_ntk_fn(mlp, vmap_axes=0), batch_size=2, device_count=0)
  np.testing.assert_allclose(np.asarray(fn(x, None, p)),
                             kernels.empirical_ntk(mlp, p, x, chunk=3), rtol=1e-5, atol=1e-6)
