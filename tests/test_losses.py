"""NTK-CL loss terms and the optimiser against independent references (numpy, torch float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ntkcl_jax import learner
from ntkcl_jax import losses


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_cross_entropy_masked_matches_numpy():
  r = np.random.RandomState(0)
  logits, labels = r.randn(6, 4).astype(np.float32), r.randint(0, 4, 6)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -logp[np.arange(6), labels][mask].mean()
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _torch_nce(z, labels, tau):
  """Literal float64 torch rendering of docs/method.md §2.3 (global positive LSE, negatives include
  positives), written independently of the JAX version."""
  zn = torch.nn.functional.normalize(z, dim=1)
  s = zn @ zn.T / tau
  n = z.shape[0]
  eye = torch.eye(n, dtype=torch.bool)
  pos = (labels[:, None] == labels[None, :]) & ~eye
  pos_term = -torch.log(torch.exp(s[pos]).sum())
  neg = torch.stack([torch.logsumexp(s[i][~eye[i]], 0) for i in range(n)]).mean()
  return pos_term + neg


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nce_value_and_gradient_match_torch(tau):
  r = np.random.RandomState(1)
  z = r.randn(7, 5)
  labels = np.array([0, 1, 0, 2, 1, 3, 4])
  zt = torch.tensor(z, requires_grad=True)
  want = _torch_nce(zt, torch.tensor(labels), tau)
  want.backward()
  f = lambda x: losses.nce(x, jnp.asarray(labels), jnp.ones(7, bool), tau)[0]
  got, g = jax.value_and_grad(f)(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(got, want.item(), rtol=1e-4)
  np.testing.assert_allclose(g, zt.grad.numpy(), rtol=2e-3, atol=2e-4)


def test_nce_masked_rows_are_ignored():
  r = np.random.RandomState(2)
  z = r.randn(6, 5).astype(np.float32)
  labels = np.array([0, 1, 0, 1, 5, 5])
  mask = np.array([1, 1, 1, 1, 0, 0], bool)
  got = losses.nce(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(mask), 0.1)[0]
  want = _torch_nce(torch.tensor(z[:4], dtype=torch.float64), torch.tensor(labels[:4]), 0.1)
  np.testing.assert_allclose(got, want.item(), rtol=1e-4)


def test_nce_without_positive_pair_is_zero_with_finite_gradient():
  z = jnp.asarray(np.random.RandomState(3).randn(4, 3), jnp.float32)
  f = lambda x: losses.nce(x, jnp.arange(4), jnp.ones(4, bool), 0.1)[0]
  v, g = jax.value_and_grad(f)(z)
  assert float(v) == 0.0
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() == 0.0
  assert not bool(losses.nce(z, jnp.arange(4), jnp.ones(4, bool))[1])


def test_orth_official_equals_closed_form_linear_functional():
  """docs/method.md §2.4: L = sum_b <u, c_hat_b + p_hat_b>, u = (I - B B^T) 1."""
  r = np.random.RandomState(4)
  d, k = 12, 5
  protos = np.concatenate([r.randn(3, d), np.zeros((4, d))]).astype(np.float32)
  basis = np.asarray(losses.orth_basis(jnp.asarray(protos), k, corrected=False))
  np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-5)  # orthonormal columns
  c, p = r.randn(6, d).astype(np.float32), r.randn(6, d).astype(np.float32)
  mask = np.array([1, 1, 1, 1, 1, 0], bool)
  u = (np.eye(d) - basis @ basis.T) @ np.ones(d)
  want = ((_np_normalize(c) + _np_normalize(p)) @ u)[mask].sum()
  got = losses.orth_official(jnp.asarray(c), jnp.asarray(p), jnp.asarray(basis), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # the span of the non-zero prototypes is inside B (its first 3 singular directions)
  a = _np_normalize(protos[:3]).T
  np.testing.assert_allclose(basis @ basis.T @ a, a, atol=1e-5)


def test_orth_corrected_is_projection_onto_prototype_span():
  r = np.random.RandomState(5)
  d = 10
  protos = np.concatenate([r.randn(3, d), np.zeros((5, d))]).astype(np.float32)
  basis = losses.orth_basis(jnp.asarray(protos), 6, corrected=True)
  a = protos[:3].T
  proj = a @ np.linalg.pinv(a)  # independent projector onto span(prototypes)
  np.testing.assert_allclose(np.asarray(basis @ basis.T), proj, atol=1e-5)
  c, p = r.randn(4, d).astype(np.float32), r.randn(4, d).astype(np.float32)
  want = sum(np.sum((_np_normalize(x) @ proj) * _np_normalize(x)) for x in (c, p))
  got = losses.orth_corrected(jnp.asarray(c), jnp.asarray(p), basis, jnp.ones(4, bool))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_l2_reg_selects_weights_like_official_names():
  r = np.random.RandomState(6)
  mk = lambda: {"adapter": {"down_proj": {"kernel": r.randn(3, 2), "bias": r.randn(2)}},
                "prompt": {"prompt_norm": {"scale": r.randn(3), "bias": r.randn(3)},
                           "global_patch_prompt": {"kernel": r.randn(4, 2), "bias": r.randn(2)}},
                "fusion": {"value": {"kernel": r.randn(2, 2), "bias": r.randn(2)}}}
  a, b = mk(), mk()
  sq = lambda x, y: float(np.sum((x - y) ** 2))
  weights = (sq(a["adapter"]["down_proj"]["kernel"], b["adapter"]["down_proj"]["kernel"]) +
             sq(a["prompt"]["prompt_norm"]["scale"], b["prompt"]["prompt_norm"]["scale"]) +
             sq(a["prompt"]["global_patch_prompt"]["kernel"],
                b["prompt"]["global_patch_prompt"]["kernel"]) +
             sq(a["fusion"]["value"]["kernel"], b["fusion"]["value"]["kernel"]))
  biases = (sq(a["adapter"]["down_proj"]["bias"], b["adapter"]["down_proj"]["bias"]) +
            sq(a["prompt"]["prompt_norm"]["bias"], b["prompt"]["prompt_norm"]["bias"]) +
            sq(a["prompt"]["global_patch_prompt"]["bias"],
               b["prompt"]["global_patch_prompt"]["bias"]) +
            sq(a["fusion"]["value"]["bias"], b["fusion"]["value"]["bias"]))
  np.testing.assert_allclose(losses.l2_reg(a, b, all_params=False), weights, rtol=1e-5)
  np.testing.assert_allclose(losses.l2_reg(a, b, all_params=True), weights + biases, rtol=1e-5)


def test_sgd_matches_torch_sgd_with_coupled_weight_decay():
  """docs/method.md §3.1: v = m v + g + wd p; p -= lr v, with lr changing between steps (epochs)."""
  r = np.random.RandomState(7)
  p0, grads = r.randn(5), [r.randn(5) for _ in range(3)]
  lrs, wd, mom = [0.1, 0.05, 0.01], 5e-3, 0.9
  tp = torch.tensor(p0, requires_grad=True)
  opt = torch.optim.SGD([tp], lr=lrs[0], momentum=mom, weight_decay=wd)
  tx = learner.sgd_torch(wd, mom)
  params = {"w": jnp.asarray(p0, jnp.float32)}
  state = tx.init(params)
  for g, lr in zip(grads, lrs):
    for group in opt.param_groups:
      group["lr"] = lr
    tp.grad = torch.tensor(g)
    opt.step()
    upd, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = jax.tree_util.tree_map(lambda p, u, lr=lr: p + lr * u, params, upd)
  np.testing.assert_allclose(params["w"], tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cosine_lr_matches_torch_scheduler_per_epoch():
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.025)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0)
  for e in range(7):
    np.testing.assert_allclose(learner.cosine_lr(0.025, e, 7), opt.param_groups[0]["lr"],
                               rtol=1e-9)
    opt.step()
    sched.step()


def test_finite_or_zero_replaces_value_and_passes_finite_gradient():
  f = lambda x: losses.finite_or_zero(3.0 * x)
  assert float(jax.grad(f)(jnp.asarray(2.0))) == 3.0
  assert float(f(jnp.asarray(jnp.inf))) == 0.0 and float(f(jnp.asarray(jnp.nan))) == 0.0
  assert float(jax.grad(f)(jnp.asarray(jnp.inf))) == 0.0
