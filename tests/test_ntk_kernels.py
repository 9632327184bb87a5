"""ntk_analysis kernels against closed forms, finite differences and neural-tangents (spec
ntk_analysis.md section 5: T1-T6, T10; T7 and T12 are in test_ntk_nt_backend.py)."""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_analysis import kernels
import _ntk_models
from ntkcl_jax import tree_utils
from ntkcl_jax.models import ntkcl, vit


_MAKE_F = [None]  # the fixture's model builder, for the float64 finite differences


def linear(params, x):
  return x @ params["w"]


@pytest.fixture(scope="module")
def tiny_vit_adapter():
  """A tiny frozen ViT with NTK-CL channel adapters: f(peft, x) -> (N, O=5) logits."""
  make_f, peft, x = _ntk_models.tiny_vit_adapter()
  _MAKE_F[0] = make_f
  return make_f(), peft, x


def test_t1_linear_model_closed_form():
  x1 = np.random.RandomState(0).randn(5, 3).astype(np.float32)
  x2 = np.random.RandomState(1).randn(4, 3).astype(np.float32)
  p = {"w": jnp.zeros((3, 2))}
  full = kernels.empirical_ntk(linear, p, x1, x2, trace=False)
  np.testing.assert_allclose(full, np.einsum("ab,oq->aboq", x1 @ x2.T, np.eye(2)), atol=1e-5)
  np.testing.assert_allclose(kernels.empirical_ntk(linear, p, x1, x2), x1 @ x2.T, atol=1e-5)


def test_t2_jacobian_equals_ntvp_equals_finite_differences(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  x = x[:3]
  k_jc = kernels.empirical_ntk(f, p, x, trace=False)
  k_vp = kernels.empirical_ntk(f, p, x, method="ntvp", trace=False)
  np.testing.assert_allclose(k_vp, k_jc, rtol=1e-4, atol=1e-5)
  with jax.enable_x64(True):  # central differences in float64
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
    flat, unravel = jax.flatten_util.ravel_pytree(p64)
    x64 = jnp.asarray(x, jnp.float64)
    f64 = _MAKE_F[0](jnp.float64)
    g = jax.jit(lambda v: f64(unravel(v), x64))
    eps = 1e-3  # the ViT softmax runs in float32 even here: larger steps, O(eps^2) error
    cols = [(g(flat.at[i].add(eps)) - g(flat.at[i].add(-eps))) / (2 * eps)
            for i in range(flat.size)]
    jac = np.stack([np.asarray(c) for c in cols], -1)  # (N, O, P)
  k_fd = np.einsum("aop,bqp->aboq", jac, jac)
  np.testing.assert_allclose(k_jc, k_fd, rtol=2e-3, atol=2e-4)


def test_t3_sum_of_logits_identity(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  full = kernels.empirical_ntk(f, p, x, trace=False)
  pntk = kernels.empirical_ntk(f, p, x, method="sum_of_logits")
  np.testing.assert_allclose(pntk, full.sum((2, 3)) / full.shape[2], rtol=1e-4, atol=1e-6)


def test_t4_sketch_exact_with_scaled_identity_and_unbiased_with_random_probes(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  traced = kernels.empirical_ntk(f, p, x)
  exact = kernels.empirical_ntk(f, p, x, method="sketch", probes=np.eye(5) / np.sqrt(5))
  np.testing.assert_allclose(exact, traced, rtol=1e-4, atol=1e-6)
  full = kernels.empirical_ntk(f, p, x, trace=False)  # sketches from the full kernel, cheaply
  draws = []
  for s in range(200):
    v = np.asarray(kernels.default_probes(jax.random.PRNGKey(s), 5, 4), np.float64)
    draws.append(np.einsum("aboq,or,qr->ab", full, v, v))
  draws = np.stack(draws)
  se = draws.std(0) / np.sqrt(len(draws))
  assert (np.abs(draws.mean(0) - traced) <= 3 * se + 1e-6).mean() > 0.95
  one = kernels.empirical_ntk(f, p, x, method="sketch", probes=np.asarray(
      kernels.default_probes(jax.random.PRNGKey(0), 5, 4)))
  np.testing.assert_allclose(one, draws[0], rtol=1e-3, atol=1e-5)


def test_t5_kernel_is_additive_over_parameter_groups(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  down, up = tree_utils.split(p, lambda path: "down_proj" in path)
  k_all = kernels.empirical_ntk(f, p, x)
  k_down = kernels.empirical_ntk(lambda q, x: f(tree_utils.merge(q, up), x), down, x)
  k_up = kernels.empirical_ntk(lambda q, x: f(tree_utils.merge(down, q), x), up, x)
  np.testing.assert_allclose(k_down + k_up, k_all, rtol=1e-4, atol=1e-6)
  shares = np.trace(k_down) / np.trace(k_all), np.trace(k_up) / np.trace(k_all)
  assert abs(sum(shares) - 1) < 1e-4


def test_t6_zero_up_projection_gives_down_projection_no_share():
  """Official init (spec 1.2): up-proj = 0 -> the down-proj group's kernel is exactly 0."""
  cfg = vit.get_config("tiny", image_size=8, patch_size=4, hidden_size=16, num_layers=2,
                       num_heads=2, mlp_dim=32)
  spec = ntkcl.ModelSpec(cfg, method="channel", ffn_num=4, frozen_sets=0, section_weights=(1.0,))
  backbone = vit.init_params(cfg, jax.random.PRNGKey(0))
  peft = ntkcl.init_trainable(spec, jax.random.PRNGKey(1))["channel"]
  down, up = tree_utils.split(peft, lambda path: "down_proj" in path)
  model = spec.vit_module("channel")
  f = lambda q, x: model.apply({"params": tree_utils.merge(backbone, q, up)}, x)
  x = jax.random.uniform(jax.random.PRNGKey(2), (4, 8, 8, 3))
  assert np.abs(kernels.empirical_ntk(f, down, x)).max() == 0.0
  g = lambda q, x: model.apply({"params": tree_utils.merge(backbone, down, q)}, x)
  assert np.trace(kernels.empirical_ntk(g, up, x)) > 0


def test_t10_chunking_jit_and_x2_none_invariance(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  a = kernels.empirical_ntk(f, p, x, chunk=6)
  b = kernels.empirical_ntk(f, p, x, chunk=4)  # uneven chunks, padded
  c = kernels.empirical_ntk(f, p, x, x, chunk=1)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(a, a.T, rtol=1e-6, atol=1e-8)


def test_memory_guard_refuses_with_what_to_shrink(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  with pytest.raises(kernels.KernelMemoryError, match="lower `chunk`"):
    kernels.empirical_ntk(f, p, x, memory_limit=1000)


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"]


def test_ntk_matvec_equals_full_kernel_times_vector():
  p = {"w1": jax.random.normal(jax.random.PRNGKey(0), (3, 16)),
       "w2": jax.random.normal(jax.random.PRNGKey(1), (16, 2))}
  x = np.random.RandomState(0).randn(5, 3).astype(np.float32)
  full = kernels.empirical_ntk(_mlp, p, x, trace=False)
  v = np.random.RandomState(1).randn(5, 2).astype(np.float32)
  got = kernels.ntk_matvec(_mlp, p, x)(jnp.asarray(v))
  expect = np.einsum("aboq,bq->ao", full, v)
  np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_float64_needs_x64_and_then_matches_float32():
  p = {"w1": jax.random.normal(jax.random.PRNGKey(0), (3, 16)),
       "w2": jax.random.normal(jax.random.PRNGKey(1), (16, 2))}
  x = np.random.RandomState(0).randn(4, 3).astype(np.float32)
  with pytest.raises(ValueError, match="enable_x64"):
    kernels.empirical_ntk(_mlp, p, x, dtype=np.float64)
  with jax.enable_x64(True):
    k64 = kernels.empirical_ntk(_mlp, p, x, dtype=np.float64)
  np.testing.assert_allclose(kernels.empirical_ntk(_mlp, p, x), k64, rtol=1e-5)
