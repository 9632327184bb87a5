"""Parameter groups of a params tree: split trainable/frozen, label groups, per-group kernels and
their trace shares.

The NTK over a union of disjoint groups is the sum of the per-group NTKs (docs/ntk_theory.md §5,
T5), so tr K_g / tr K is each group's share of the kernel (group_ntks, trace_shares). Traces
alone need only per-sample Jacobian norms: group_traces gets every group's trace, and the trace of
its centred kernel H K_g H, from one pass of per-sample Jacobians (no kernel formed).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ntk_analysis import kernels
from ntkcl_jax import tree_utils

Labeler = Union[Callable[[str], Optional[str]], Mapping[str, str]]

# Groups of NTK-CL's trainable tree (ntkcl_jax/models/ntkcl.py naming; first match wins): the
# channel adapters' down and up projections, the patch branch's token-mixing Linear ("Mix") and
# its LayerNorm, the fusion's Q / K / V, and the proxy head when it is differentiated.
NTKCL_GROUPS = {
    r"adapter/down_proj/": "adapter down", r"adapter/up_proj/": "adapter up",
    r"global_patch_prompt/": "prompt Mix", r"prompt_norm/scale": "prompt LN scale",
    r"prompt_norm/bias": "prompt LN bias", r"^fusion/query/": "fusion Q",
    r"^fusion/key/": "fusion K", r"^fusion/value/": "fusion V", r"^fusion/": "fusion other",
    r"^proxy/": "proxy head", r".": "other"}


def partition(params, trainable: Union[Callable[[str], bool], str]):
  """(trainable, frozen) by a path predicate or a regular expression on 'a/b/c' paths."""
  pred = (lambda p: re.search(trainable, p) is not None) if isinstance(trainable, str) else trainable
  yes, no = tree_utils.split(params, pred)
  if not yes:
    raise ValueError("partition: no parameter matched the trainable predicate; paths look like "
                     f"{list(tree_utils.flatten(params))[:3]}")
  return yes, no


def layer_label(path: str) -> str:
  """Default group label: the module path without the leaf name ('.../adapter/down_proj')."""
  return "/".join(path.split("/")[:-1]) or path


def prefix_label(depth: int) -> Callable[[str], str]:
  """Labeler grouping by the first `depth` path components (e.g. 2 -> one group per block)."""
  return lambda path: "/".join(path.split("/")[:depth])


def label_paths(params, labeler: Labeler = layer_label) -> dict[str, str]:
  """{path: group}. `labeler` is a function of the path or {regex: group} (first match wins)."""
  out = {}
  for path in tree_utils.flatten(params):
    if callable(labeler):
      g = labeler(path)
    else:
      g = next((lab for pat, lab in labeler.items() if re.search(pat, path)), None)
    if g is None:
      raise ValueError(f"label_paths: no group for parameter {path!r}; extend the labeler")
    out[path] = g
  return out


def split_groups(params, labeler: Labeler = layer_label) -> dict[str, dict]:
  """{group: sub-dict of params}; the groups are disjoint and cover params."""
  labels = label_paths(params, labeler)
  flat = tree_utils.flatten(params)
  groups: dict[str, dict] = {}
  for path, g in labels.items():
    groups.setdefault(g, {})[path] = flat[path]
  return {g: tree_utils.unflatten(d) for g, d in sorted(groups.items())}


def restrict(f: Callable, others) -> Callable:
  """f(params, x) -> f_g(q, x) = f(q merged with the fixed `others`, x)."""
  return lambda q, x: f(tree_utils.merge(q, others), x)


def complement(params, group_params) -> dict:
  """params minus the paths in group_params."""
  keep = set(tree_utils.flatten(group_params))
  return tree_utils.split(params, lambda p: p not in keep)[0]


def trace_shares(kernels_by_group: Mapping[str, np.ndarray]) -> dict[str, float]:
  """tr K_g / sum_g tr K_g (traced (N, N) or full (N, N, O, O) kernels)."""
  def tr(k):
    k = np.asarray(k, np.float64)
    return float(np.einsum("aa->", k) if k.ndim == 2 else np.einsum("aaoo->", k))
  traces = {g: tr(k) for g, k in kernels_by_group.items()}
  total = sum(traces.values())
  return {g: (t / total if total > 0 else 0.0) for g, t in traces.items()}


def group_ntks(f: Callable, params, x1, x2=None, labeler: Labeler = layer_label,
               **ntk_kwargs) -> dict[str, np.ndarray]:
  """{group: K_g}: the NTK of f over each group's parameters, the others held fixed; the sum over
  groups is the NTK over all of params. `ntk_kwargs` configure kernels.ntk_fn."""
  out = {}
  for name, q in split_groups(params, labeler).items():
    out[name] = kernels.empirical_ntk(restrict(f, complement(params, q)), q, x1, x2, **ntk_kwargs)
  return out


def group_traces(f: Callable, params, x, labeler: Labeler = layer_label,
                 batch: int = 4) -> dict[str, dict[str, float]]:
  """{group: {'trace': tr K_g, 'centred': tr H K_g H}} for the traced NTK (mean over the O
  outputs) of f over `params` on the samples x, from one pass of per-sample Jacobians:
  tr K_g = (1/O) sum_i ||J_g(x_i)||^2 and tr H K_g H = tr K_g - (1/(O N)) ||sum_i J_g(x_i)||^2.
  Costs about one kernel's Jacobians whatever the number of groups (group_ntks: one per group)."""
  labels = label_paths(params, labeler)
  n = len(jax.tree_util.tree_leaves(x)[0])
  out_shape = jax.eval_shape(f, params, jax.tree_util.tree_map(lambda a: a[:1], x)).shape
  if len(out_shape) != 2:
    raise ValueError(f"f must return (N, O); got {out_shape} for one sample")
  o = out_shape[1]

  def one(p, xi):
    return jax.jacrev(lambda q: f(q, jax.tree_util.tree_map(lambda t: t[None], xi))[0])(p)

  @jax.jit
  def sums(p, xb, valid):
    jac = jax.vmap(one, in_axes=(None, 0))(p, xb)  # leaves (B, O, *shape)
    w = valid.astype(jnp.float32)

    def reduce(j):
      jw = j * w.reshape((-1,) + (1,) * (j.ndim - 1)).astype(j.dtype)
      return jnp.sum(jnp.square(jw)), jnp.sum(jw, axis=0)
    return jax.tree_util.tree_map(reduce, jac)
  sq = {path: 0.0 for path in labels}
  tot: dict = {}
  for s in range(0, n, batch):
    e = min(n, s + batch)
    xb = jax.tree_util.tree_map(
        lambda t: jnp.concatenate([t[s:e], jnp.repeat(t[e - 1:e], batch - (e - s), 0)]), x)
    part = tree_utils.flatten(jax.device_get(sums(params, xb, jnp.arange(batch) < e - s)),
                              sep="/")
    for path in labels:  # each leaf of `part` is the pair (sum of squares, sum over samples)
      sq[path] += float(part[path][0])
      tot[path] = tot.get(path, 0.0) + np.asarray(part[path][1], np.float64)
  out: dict[str, dict[str, float]] = {}
  for path, g in labels.items():
    d = out.setdefault(g, {"trace": 0.0, "centred": 0.0})
    d["trace"] += sq[path] / o
    d["centred"] += (sq[path] - float(np.sum(np.square(tot[path]))) / n) / o
  return dict(sorted(out.items()))
