"""ntk_analysis kernels against closed forms, finite differences and neural-tangents
(docs/ntk_theory.md §5: T1-T6, T10; T7 and T12 are in test_ntk_nt_backend.py), and a long
kernel's progress lines."""
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_analysis import kernel_memory, kernels, readouts
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
  pntk = kernels.empirical_ntk(readouts.sum_of_logits(f), p, x)
  np.testing.assert_allclose(pntk, full.sum((2, 3)) / full.shape[2], rtol=1e-4, atol=1e-6)


def test_t4_sketch_exact_with_scaled_identity_and_unbiased_with_random_probes(tiny_vit_adapter):
  f, p, x = tiny_vit_adapter
  traced = kernels.empirical_ntk(f, p, x)
  exact = kernels.empirical_ntk(readouts.feature_sketch(f, np.eye(5)), p, x)
  np.testing.assert_allclose(exact, traced, rtol=1e-4, atol=1e-6)
  full = kernels.empirical_ntk(f, p, x, trace=False)  # sketches from the full kernel, cheaply
  draws = []
  for s in range(200):  # the traced (mean over R) kernel of V^T f, probes N(0, 1/O)
    v = np.asarray(readouts.sketch_probes(jax.random.PRNGKey(s), 5, 4), np.float64)
    draws.append(np.einsum("aboq,or,qr->ab", full, v, v) / v.shape[1])
  draws = np.stack(draws)
  se = draws.std(0) / np.sqrt(len(draws))
  assert (np.abs(draws.mean(0) - traced) <= 3 * se + 1e-6).mean() > 0.95
  one = kernels.empirical_ntk(readouts.feature_sketch(f, readouts.probes(5, 4, seed=0)), p, x)
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
  """Official init (docs/ntk_theory.md §1.2): up-proj = 0 -> the down-proj group's kernel is
  exactly 0."""
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
  with pytest.raises(kernel_memory.KernelMemoryError, match="lower `chunk`"):
    kernels.empirical_ntk(f, p, x, chunk=16, memory_limit=1000)
  with pytest.raises(kernel_memory.KernelMemoryError, match="even with chunk 1.*memory_limit"):
    kernels.empirical_ntk(f, p, x, memory_limit=1000)  # automatic chunk: nothing fits
  with pytest.raises(kernel_memory.KernelMemoryError, match="on the devices with chunk 16"):
    kernels.empirical_ntk(f, p, x, chunk=16, memory_limit=1000, contract="device")
  with pytest.raises(kernel_memory.KernelMemoryError, match="on the devices even with chunk 1"):
    kernels.empirical_ntk(f, p, x, memory_limit=1000, contract="device")


@pytest.mark.parametrize("same", [True, False])
def test_device_chunk_choice_is_the_largest_that_fits_both_budgets(same):
  """choose_chunk_device against trying every chunk: the largest whose device_estimate is
  within the host and the per-device budget."""
  rng = np.random.RandomState(1)
  for _ in range(200):
    n1, n2 = rng.randint(1, 60), rng.randint(1, 60)
    n2 = n1 if same else n2
    o, p, trace = rng.randint(1, 20), rng.randint(1, 10**6), bool(rng.randint(2))
    layout = kernel_memory.DeviceLayout(devices=rng.randint(1, 9), local=rng.randint(1, 5),
                                        batch=rng.randint(1, 5), call=rng.randint(0, 10**7),
                                        cpu=bool(rng.randint(2)))
    host, dev = rng.randint(1, 10**10), rng.randint(1, 10**10)
    ests = {c: kernel_memory.device_estimate(n1, n2, o, p, c, trace, layout, same=same)
            for c in range(1, (n1 if same else max(n1, n2)) + 1)}
    fits = [c for c, e in ests.items() if e.host <= host and e.device <= dev]
    got = kernel_memory.choose_chunk_device(n1, n2, o, p, trace, layout, host, dev, same=same)
    assert got == (max(fits) if fits else None), (n1, n2, o, p, trace, layout, host, dev)


def _brute_force_chunk(n1, n2, o, p, trace, limit, same, scratch):
  """Independent expectation: bytes held are the Jacobian rows of the panels alive at once, the
  kernel, and (traced, several outputs) the float32 copies of one output's rows of both panels
  over a slice of parameters that keeps the copies under 256 MiB (at least 4096, at most 2^18
  parameters)."""
  best = None
  for c in range(1, max(n1, n2) + 1):
    if same and c > n1:
      break
    rows = n1 if (same and c >= n1) else min(c, n1) + min(c, n2)
    both = min(c, n1) + min(c, n2)
    cols = min(p, 2**18, max(4096, (256 << 20) // (4 * both)))
    copies = both * cols * 4 if trace and o > 1 else 0
    need = rows * o * p * 4 + n1 * n2 * (1 if trace else o * o) * 8 + copies + scratch
    if need <= limit:
      best = c
  return best


@pytest.mark.parametrize("same", [True, False])
def test_chunk_choice_is_the_largest_that_fits(same):
  rng = np.random.RandomState(0)
  for _ in range(300):
    n1, n2 = rng.randint(1, 90), rng.randint(1, 90)
    n2 = n1 if same else n2
    o, p, trace = rng.randint(1, 30), rng.randint(1, 10**6), bool(rng.randint(2))
    scratch = rng.randint(0, 10**8)
    limit = rng.randint(1, 90 * 30 * 10**6 * 4)
    want = _brute_force_chunk(n1, n2, o, p, trace, limit, same, scratch)
    got = kernel_memory.choose_chunk(n1, n2, o, p, trace, limit, same=same, activations=scratch)
    assert got == want, (n1, n2, o, p, trace, limit, scratch)
    if want is None:
      with pytest.raises(kernel_memory.KernelMemoryError, match="even with chunk 1"):
        kernel_memory.check_memory(n1, n2, o, p, None, trace, limit, same=same,
                                   activations=scratch)
    else:
      assert kernel_memory.check_memory(n1, n2, o, p, None, trace, limit, same=same,
                                        activations=scratch) <= limit


def test_automatic_chunk_equals_explicit_and_skips_unused_parameters(tiny_vit_adapter):
  """Ample memory: one panel, each Jacobian computed once. A budget for two panels of 2 samples:
  chunk 2, column panels recomputed, same kernel. A parameter the output never reaches is left
  out of the Jacobian (not of the parameter count), and the kernel is unchanged."""
  f, p, x = tiny_vit_adapter
  n, n_p = len(x), kernel_memory.num_params(p)
  prof = {}
  one = kernels.empirical_ntk(f, p, x, profile=prof)
  assert prof["chunk"] == n and prof["jacobian_samples"] == n and prof["P_active"] == n_p
  assert prof["output_groups"] == 1
  limit = kernel_memory.estimate_bytes(n, n, 5, n_p, 2, True, same=True,
                                       activations=prof["scratch_bytes"])
  prof2 = {}
  small = kernels.empirical_ntk(f, dict(p, unused=jnp.ones((1000,))), x, memory_limit=limit,
                                profile=prof2, output_groups=1)
  assert prof2["P"] == n_p + 1000 and prof2["P_active"] == n_p
  assert prof2["chunk"] == 2 and prof2["jacobian_samples"] == 6 + 4 + 2  # (0,2) (2,4) (4,6)
  np.testing.assert_allclose(small, one, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(small, kernels.empirical_ntk(f, p, x, chunk=2), rtol=1e-5,
                             atol=1e-7)


def test_output_groups_sum_to_the_unsplit_kernel(tiny_vit_adapter):
  """K = sum_g (|g|/O) K_g: 2 and 3 (uneven) output groups give the one-group kernel; under a
  budget where one panel of all outputs does not fit but one of half of them does, the automatic
  choice splits in two and still computes each Jacobian once per group."""
  f, p, x = tiny_vit_adapter
  n, n_p = len(x), kernel_memory.num_params(p)
  prof = {}
  one = kernels.ntk_fn(f, profile=prof)(p, x)
  x2 = x[:4] + 0.1
  one_x2 = kernels.ntk_fn(f, output_groups=1)(p, x, x2)
  for g in (2, 3, 5):
    np.testing.assert_allclose(kernels.ntk_fn(f, output_groups=g)(p, x), one, rtol=1e-6)
    np.testing.assert_allclose(kernels.ntk_fn(f, output_groups=g)(p, x, x2), one_x2, rtol=1e-6)
  # independent expectation: each output group's traced kernel from a naive jacrev J J^T
  jac = jax.jacrev(f)(p, x)
  flat = np.concatenate([np.asarray(l, np.float64).reshape(n, 5, -1)
                         for l in jax.tree_util.tree_leaves(jac)], -1)
  k_g = [np.einsum("aop,bop->ab", flat[:, i], flat[:, i]) / len(i)
         for i in (np.arange(0, 3), np.arange(3, 5))]
  np.testing.assert_allclose(3 / 5 * k_g[0] + 2 / 5 * k_g[1], one, rtol=1e-4, atol=1e-6)
  scratch = prof["scratch_bytes"]
  limit = kernel_memory.estimate_bytes(n, n, 3, n_p, n, True, same=True, activations=scratch)
  assert limit < kernel_memory.estimate_bytes(n, n, 5, n_p, n, True, same=True,
                                              activations=scratch)
  prof2 = {}
  split = kernels.ntk_fn(f, memory_limit=limit, profile=prof2)(p, x)
  assert prof2["output_groups"] == 2 and prof2["chunk"] == n
  assert prof2["jacobian_samples"] == 2 * n  # each Jacobian once per group
  np.testing.assert_allclose(split, one, rtol=1e-6)
  with pytest.raises(ValueError, match="traced kernels only"):
    kernels.ntk_fn(f, trace=False, output_groups=2)(p, x)


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


_PROGRESS = re.compile(r"NTK (\w+) (\d+)/(\d+): ([\d.]+) s elapsed, ETA ([\d.]+) s")


def _progress(lines, unit="panels") -> list:
  """(done, total, elapsed) of the progress lines of `unit` among logged lines."""
  found = [_PROGRESS.fullmatch(line) for line in lines]
  return [(int(m[2]), int(m[3]), float(m[4])) for m in found if m and m[1] == unit]


@pytest.mark.parametrize("contract", ["host", "device"])
def test_progress_counts_panels_up_to_the_total(tiny_vit_adapter, monkeypatch, capsys, contract):
  """Panels of 2 of the 6 samples: 6 blocks (row panel x column panel) of a joint kernel, 12
  over 2 output groups; logged every panel when PROGRESS_SECONDS is 0, monotone, ending at n/n
  (ETA 0); with a long interval only the last line; progress=True draws a tqdm bar."""
  f, p, x = tiny_vit_adapter
  monkeypatch.setattr(kernels, "PROGRESS_SECONDS", 0.0)
  for groups, total in ((1, 6), (2, 12)):
    lines = []
    kernels.ntk_fn(f, chunk=2, output_groups=groups, log=lines.append, contract=contract)(p, x)
    got = _progress(lines)
    assert [d for d, _, _ in got] == list(range(1, total + 1)), lines
    assert {n for _, n, _ in got} == {total}
    assert all(a[2] <= b[2] for a, b in zip(got, got[1:]))  # elapsed grows
    assert lines[-1].endswith("ETA 0.0 s")
  monkeypatch.setattr(kernels, "PROGRESS_SECONDS", 1e9)
  lines = []
  kernels.ntk_fn(f, chunk=2, log=lines.append, contract=contract, progress=True)(p, x)
  assert [(d, n) for d, n, _ in _progress(lines)] == [(6, 6)]
  assert "NTK panels" in capsys.readouterr().err  # the tqdm bar
  lines = []
  kernels.ntk_fn(f, method="ntvp", log=lines.append)(p, x[:2])  # 2 samples x 5 outputs
  assert [(d, n) for d, n, _ in _progress(lines, "columns")] == [(10, 10)]
