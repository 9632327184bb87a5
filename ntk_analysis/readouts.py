"""Readouts: which f(params, x) to differentiate (docs/ntk_theory.md §3.3).

Generic ones take a function phi(params, x) -> (B, D) (features or logits) and return
f(params, x) -> (B, O) for kernels.ntk_fn, or (B, V, O) for multi-view stacks. One probe
convention for sketches: probes (D, R) with N(0, 1/D) entries (sketch_probes), and the traced
kernel (mean over the R outputs) of V^T phi, an unbiased estimate of phi's traced NTK; probes = I
give it exactly. `model_readout` is the feature sketch of an NTK-CL run's learner state.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax.models import ntkcl

VIEWS = ("channel", "patch", "fused")

Readout = Callable[[object, jax.Array], jax.Array]


def sketch_probes(key, dim: int, num_probes: int) -> jax.Array:
  """(D, R) fixed probes with N(0, 1/D) entries, drawn once and shared across tasks and
  checkpoints: the traced (mean over R) kernel of V^T phi is unbiased for the feature-traced
  NTK."""
  return jax.random.normal(key, (dim, num_probes)) / math.sqrt(dim)


def probes(dim: int, num_probes: int, seed: int = 0) -> np.ndarray:
  """sketch_probes of PRNGKey(seed) as a host array: the probes of one study (every task and
  checkpoint of a run shares them)."""
  return np.asarray(sketch_probes(jax.random.PRNGKey(seed), dim, num_probes))


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


def inert_fusion_parameters(spec) -> tuple:
  """Trainable leaves whose Jacobian is identically zero: the single-key attention fusion's query
  and key (softmax over one key is exactly 1, docs/method.md §1.5). Leaving them out of the
  differentiated tree changes no kernel entry and saves their Jacobian's memory."""
  if spec.method == "ntkcl" and spec.fusion == "attention" and not spec.switches.fix_fusion:
    return ("query", "key")
  return ()


def readout_params(learner, state) -> dict:
  """The tree model_readout differentiates: the trainable PEFT tree minus
  `inert_fusion_parameters` (for another checkpoint of the same readout, e.g. within a task)."""
  params = learner.trainable(state)
  inert = inert_fusion_parameters(learner.spec)
  if inert:
    params = dict(params, fusion={k: v for k, v in params["fusion"].items() if k not in inert})
  return params


def model_readout(learner, state, view: str, probe_matrix):
  """(f, params) of an NTK-CL learner state: f(params, x) -> (N, R) feature sketch of a view, or
  (N, 3R) for view='all' (the three views stacked: its traced kernel is the mean of theirs).

  `params` is readout_params(learner, state); f closes over the inert fusion parameters, the
  frozen backbone and the frozen PEFT sets (which change at task ends only, so one f serves
  every checkpoint within a task: the inert parameters have no effect on f). f computes in the
  learner's compute policy, the sketch too at its matmul precision: load a run with
  runs.load_run(..., compute='float32'), the default, for a float32 readout."""
  spec, backbone, frozen = learner.spec, learner.backbone, learner.frozen(state)
  trainable = learner.trainable(state)
  inert = {k: trainable["fusion"][k] for k in inert_fusion_parameters(spec)}
  params = readout_params(learner, state)
  v = jnp.asarray(probe_matrix)
  if view != "all" and view not in VIEWS:
    raise ValueError(f"view={view!r}; one of {VIEWS + ('all',)}")

  def f(p, x):
    if inert:
      p = dict(p, fusion=dict(p["fusion"], **inert))
    feats = ntkcl.features(spec, backbone, p, frozen, x, train=False)
    with ntkcl.matmul_precision(spec):
      if view == "all":
        return jnp.concatenate([feats[k] @ v for k in VIEWS], axis=-1)
      return feats[view] @ v
  return f, params
