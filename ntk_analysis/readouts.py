"""Readouts: which f(params, x) to differentiate (spec ntk_analysis.md 3.3).

All take a feature function phi(params, x) -> (B, D) (the fused feature m, or c, or p) and return
f(params, x) -> (B, O) for kernels.empirical_ntk, or (B, V, O) for multi-view stacks.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp

Readout = Callable[[object, jax.Array], jax.Array]


def sketch_probes(key, dim: int, num_probes: int) -> jax.Array:
  """(D, R) fixed probes with N(0, 1/D) entries, drawn once and shared across tasks and
  checkpoints: the traced (mean over R) kernel of V^T phi is unbiased for the feature-traced NTK."""
  return jax.random.normal(key, (dim, num_probes)) / math.sqrt(dim)


def feature_sketch(phi: Readout, probes) -> Readout:
  """f(x) = V^T phi(x), (B, R)."""
  probes = jnp.asarray(probes)

  def f(params, x):
    z = phi(params, x)
    chex.assert_rank(z, 2)
    return z @ probes.astype(z.dtype)
  return f


def linear_logits(phi: Readout, head, bias=None) -> Readout:
  """Proxy-head logits phi(x) W + b (within-task kernels only: heads change across tasks)."""
  def f(params, x):
    z = phi(params, x) @ jnp.asarray(head)
    return z if bias is None else z + jnp.asarray(bias)
  return f


def prototype_logits(phi: Readout, prototypes, scale: float = 1.0, eps: float = 1e-12) -> Readout:
  """Cosine logits s * <phi/|phi|, p_c/|p_c|> against a fixed prototype table (C, D)."""
  protos = jnp.asarray(prototypes)
  protos = protos / jnp.maximum(jnp.linalg.norm(protos, axis=-1, keepdims=True), eps)

  def f(params, x):
    z = phi(params, x)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)
    return scale * z @ protos.T.astype(z.dtype)
  return f


def sum_of_logits(f: Readout) -> Readout:
  """(B, 1) = sum_c f_c / sqrt(O): its NTK is the pNTK (1/O) grad(sum f) grad(sum f)^T."""
  def g(params, x):
    y = f(params, x)
    return jnp.sum(y, axis=-1, keepdims=True) / math.sqrt(y.shape[-1])
  return g


def true_class(f: Readout, labels) -> Readout:
  """(B, 1) logit of each sample's own class (labels fixed with x: use on the matching batch)."""
  labels = jnp.asarray(labels)

  def g(params, x):
    y = f(params, x)
    return jnp.take_along_axis(y, labels[:y.shape[0], None], axis=1)
  return g


def multiview(views: Sequence[Readout]) -> Readout:
  """Stacks V readouts with the same O into (B, V, O) (the 'tripled features' kernel, 3.3)."""
  if not views:
    raise ValueError("multiview needs at least one view")

  def f(params, x):
    return jnp.stack([v(params, x) for v in views], axis=1)
  return f
