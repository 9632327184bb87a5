"""NTK-CL loss terms (docs/method.md section 2), pure functions with masks for padded rows.

L = CE_c + CE_p + CE_m + nce_temp * L_mi + dis_temp * L_orth + reg_temp * L_reg   (docs/method.md §2)
Every term takes a boolean `mask` (B,) so padded rows of the last batch do not count.
"""
from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from ntkcl_jax import tree_utils
from ntkcl_jax.models import peft


def masked_mean(x, mask):
  m = mask.astype(x.dtype)
  return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def cross_entropy(logits, labels, mask):
  """Mean CE over valid rows (F.cross_entropy, mean reduction; docs/method.md §2.2)."""
  chex.assert_rank(logits, 2)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return masked_mean(nll, mask)


def _lse_masked(x, m):
  """log sum exp over entries where m is true; -inf if none (no NaN gradient: double where)."""
  any_ = m.any()
  x_safe = jnp.where(m, x, -jnp.inf)
  mx = jnp.where(any_, jnp.max(jnp.where(m, x, -jnp.inf)), 0.0)
  s = jnp.sum(jnp.where(m, jnp.exp(x_safe - jax.lax.stop_gradient(mx)), 0.0))
  return jnp.where(any_, jnp.log(jnp.where(any_, s, 1.0)) + jax.lax.stop_gradient(mx), -jnp.inf)


def nce(z, labels, mask, tau: float = 0.1):
  """The official nce_loss (docs/method.md §2.3), returns (value, has_positive).

  NCE = -log sum_{(i,j) in Pos} exp(S_ij) + (1/n) sum_i log sum_{j != i} exp(S_ij), S = cos / tau,
  Pos = ordered pairs i != j with equal labels, n = number of valid rows. Without any positive pair
  the official value is +inf and nan_to_num zeroes the whole term: we return 0 with zero gradient.
  """
  chex.assert_rank(z, 2)
  zn = peft.l2_normalize(z)
  s = zn @ zn.T / tau
  n = z.shape[0]
  valid = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
  pos = valid & (labels[:, None] == labels[None, :])
  has_pos = pos.any()
  pos_term = -_lse_masked(s, pos)
  # per-row LSE over j != i (both valid), averaged over valid rows
  mx = jax.lax.stop_gradient(jnp.max(jnp.where(valid, s, -1e30), axis=1, keepdims=True))
  ex = jnp.exp(jnp.where(valid, s - mx, -jnp.inf))  # masked before exp: no inf * 0 gradient
  row = jnp.log(jnp.maximum(jnp.sum(ex, axis=1), 1e-30)) + mx[:, 0]
  row_ok = mask & valid.any(1)
  neg_term = (jnp.where(row_ok, row, 0.0)).sum() / jnp.maximum(mask.sum(), 1)
  value = jnp.where(has_pos, jnp.where(has_pos, pos_term, 0.0) + neg_term, 0.0)
  return value, has_pos


def orth_basis(prototypes, k: int, *, corrected: bool, rtol: float = 1e-6):
  """B (D, k) for the orthogonality term (docs/method.md §2.4), computed once per task.

  A = column-normalised prototypes^T (zero rows stay 0); B = first k left singular vectors.
  corrected: columns whose singular value is ~0 (zero prototypes / SVD completion) are zeroed,
  so B spans only what the prototypes actually span (docs/method.md §10 switch 3).
  """
  a = peft.l2_normalize(prototypes, axis=-1).T
  u, s, _ = jnp.linalg.svd(a, full_matrices=True)
  k = min(k, u.shape[1])
  b = u[:, :k]
  if corrected:
    sk = jnp.zeros((k,)).at[:min(k, s.shape[0])].set(s[:k])
    keep = sk > rtol * jnp.maximum(s.max(), 1e-30)
    b = b * keep[None, :]
  return b


def orth_official(c, p, basis, mask):
  """Signed element sum of r(x) = x_hat - x_hat B B^T over c and p (docs/method.md §2.4; a linear term)."""
  def r(x):
    xn = peft.l2_normalize(x)
    return xn - (xn @ basis) @ basis.T
  rows = r(c).sum(-1) + r(p).sum(-1)
  return (rows * mask.astype(rows.dtype)).sum()


def orth_corrected(c, p, basis, mask):
  """Overlap penalty sum_b ||x_hat_b B||^2 for x in {c, p} (our fix_orth form, docs/method.md §10 switch 3)."""
  def ov(x):
    return jnp.sum(jnp.square(peft.l2_normalize(x) @ basis), -1)
  rows = ov(c) + ov(p)
  return (rows * mask.astype(rows.dtype)).sum()


def is_weight_official(path: str) -> bool:
  """Official reg selects parameters whose PyTorch name contains 'weight' (docs/method.md §2.5): Linear
  weights (our 'kernel') and LayerNorm weights (our prompt_norm 'scale'); never biases."""
  leaf = path.rsplit("/", 1)[-1]
  return leaf == "kernel" or (leaf == "scale" and "prompt_norm" in path)


def l2_reg(params, ref, *, all_params: bool,
           selector: Callable[[str], bool] = is_weight_official):
  """sum ||theta - theta_ref||^2 (no 1/2, no mean; docs/method.md §2.5); fix_l2_all includes biases."""
  fp, fr = tree_utils.flatten(params), tree_utils.flatten(ref)
  total = jnp.zeros(())
  for k, v in fp.items():
    if all_params or selector(k):
      total = total + jnp.sum(jnp.square(v - fr[k]))
  return total


def finite_or_zero(x):
  """torch.nan_to_num(x, 0, 0, 0) on a scalar loss term (docs/method.md §2.3 guard). The gradient is zero
  where the value is replaced, provided the term's own computation has finite partials (as
  `nce` guarantees with its masked double-where); like torch, it cannot repair inner infs."""
  ok = jnp.isfinite(x)
  return jnp.where(ok, jnp.where(ok, x, 0.0), 0.0)
