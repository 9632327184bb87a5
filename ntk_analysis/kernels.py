"""Empirical NTK K(x1, x2) = J(x1) J(x2)^T over `params` of f(params, x) -> (N, O).

Conventions (spec ntk_analysis.md 3.2): `trace=True` returns the mean over outputs (N1, N2), the
neural-tangents convention; `trace=False` the full (N1, N2, O, O). Methods:
  jacobian       Jacobian contraction, chunked over samples, accumulated on the host
  ntvp           NTK-vector products (jvp of vjp), column by column; no Jacobian is formed
  sum_of_logits  (1/O) grad(sum_c f_c) grad(sum_c f_c)^T (Mohamadi et al.)
  sketch         K_s = sum_r (J^T v_r)(J^T v_r)^T over R fixed probes v_r (columns of an (O, R)
                 matrix shared across tasks and checkpoints). Default probes v ~ N(0, I/(O R)),
                 so E[K_s] = the traced K; probes = I/sqrt(O) give the traced K exactly (T4).
Backends: 'jax' (ours, always available) or 'neural_tangents' (through nt_compat).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("jacobian", "ntvp", "sum_of_logits", "sketch")
DEFAULT_MEMORY_LIMIT = 4 << 30  # bytes a kernel computation may use on the host/device


class KernelMemoryError(MemoryError):
  """The requested kernel would not fit; the message says what to shrink."""


def num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def estimate_bytes(n1: int, n2: int, outputs: int, n_params: int, chunk: int,
                   trace: bool, itemsize: int = 4) -> int:
  """Jacobian chunks of both inputs plus the kernel itself."""
  jac = 2 * chunk * outputs * n_params * itemsize
  kern = n1 * n2 * (1 if trace else outputs * outputs) * 8
  return jac + kern


def check_memory(n1, n2, outputs, n_params, chunk, trace, limit=DEFAULT_MEMORY_LIMIT, itemsize=4):
  need = estimate_bytes(n1, n2, outputs, n_params, chunk, trace, itemsize)
  if need > limit:
    raise KernelMemoryError(
        f"an NTK of {n1}x{n2} samples, {outputs} outputs, {n_params:,} parameters with chunk "
        f"{chunk} needs about {need / 2**30:.1f} GiB (limit {limit / 2**30:.1f} GiB): lower "
        f"`chunk`, use fewer samples, fewer outputs (method='sketch' with a few probes, or "
        f"trace=True), or method='ntvp' (no Jacobian); raise `memory_limit` if you have the memory")
  return need


def _flat_jac(f, params, x):
  """(n, O, P) Jacobian of f(params, x) w.r.t. params, flattened over the parameter tree.

  Per-sample jacrev under vmap (NT's vmap_axes=0): O backward passes of one sample each, not O
  passes over the whole chunk (f must treat samples independently, as inference-mode nets do).
  """
  def one(xi):
    jac = jax.jacrev(lambda p: f(p, jax.tree_util.tree_map(lambda t: t[None], xi))[0])(params)
    leaves = jax.tree_util.tree_leaves(jac)
    o = leaves[0].shape[0]
    return jnp.concatenate([l.reshape(o, -1) for l in leaves], axis=-1)
  return jax.vmap(one)(x)


def _contract(j1, j2, trace):
  hp = jax.lax.Precision.HIGHEST
  if trace:
    return jnp.einsum("aop,bop->ab", j1, j2, precision=hp) / j1.shape[1]
  return jnp.einsum("aop,bqp->abo q".replace(" ", ""), j1, j2, precision=hp)


def _chunks(n, chunk):
  return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def empirical_ntk(f: Callable, params, x1, x2=None, *, method: str = "jacobian",
                  trace: bool = True, chunk: int = 16, probes=None, key=None,
                  num_probes: int = 8, groups=None, backend: str = "jax",
                  implementation: int = 1, dtype=np.float32,
                  memory_limit: int = DEFAULT_MEMORY_LIMIT):
  """The empirical NTK of f at params between x1 and x2 (x2=None: x1), as a float64 host array.

  `dtype`: the compute dtype (float64 needs `with jax.enable_x64(True):` or jax_enable_x64).
  `groups`: a peft labeler (function of the path, or {regex: group}); then returns
  (K, {group: K_g}) with K = sum_g K_g (spec 5, T5).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; one of {METHODS}")
  if np.dtype(dtype) == np.float64:
    if not jax.config.jax_enable_x64:
      raise ValueError("dtype=float64 needs 64-bit JAX: wrap the call in `with "
                       "jax.enable_x64(True):` or set jax.config.update('jax_enable_x64', True)")
    cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
    params, x1 = cast(params), cast(x1)
    x2 = None if x2 is None else cast(x2)
    probes = None if probes is None else cast(probes)
  elif np.dtype(dtype) != np.float32:
    raise ValueError(f"dtype={dtype}: float32 or float64")
  kw = dict(method=method, trace=trace, chunk=chunk, probes=probes, key=key,
            num_probes=num_probes, backend=backend, implementation=implementation,
            memory_limit=memory_limit)
  if groups is not None:
    from ntk_analysis import peft  # pylint: disable=g-import-not-at-top
    parts = peft.split_groups(params, groups)
    per = {}
    for name, q in parts.items():
      others = peft.complement(params, q)
      per[name] = _ntk(peft.restrict(f, others), q, x1, x2, **kw)
    return sum(per.values()), per
  return _ntk(f, params, x1, x2, **kw)


def _ntk(f, params, x1, x2, *, method, trace, chunk, probes, key, num_probes, backend,
         implementation, memory_limit, dtype=np.float64):
  """empirical_ntk without the dtype / groups handling."""
  same = x2 is None
  x2 = x1 if same else x2
  n1, n2 = len(jax.tree_util.tree_leaves(x1)[0]), len(jax.tree_util.tree_leaves(x2)[0])
  out_shape = jax.eval_shape(f, params, jax.tree_util.tree_map(lambda a: a[:1], x1)).shape
  if len(out_shape) == 3 and method in ("jacobian", "ntvp"):  # (B, V, O) views -> (N,N,V,V)
    v, o = out_shape[1:]
    flat = lambda p, x: f(p, x).reshape(-1, v * o)
    full = _ntk(flat, params, x1, None if same else x2, method=method, trace=False, chunk=chunk,
                probes=None, key=None, num_probes=num_probes, backend=backend,
                implementation=implementation, memory_limit=memory_limit, dtype=dtype)
    full = full.reshape(full.shape[:2] + (v, o, v, o))
    return np.einsum("abvowo->abvw", full) / o if trace else full
  if len(out_shape) != 2:
    raise ValueError(f"f(params, x) must return (N, O) (or (N, V, O) with method 'jacobian' or "
                     f"'ntvp'); got shape {out_shape} for one sample")
  o = out_shape[1]
  g = f
  if method == "sum_of_logits":
    g = lambda p, x: jnp.sum(f(p, x), axis=-1, keepdims=True) / math.sqrt(o)
    o_eff, trace_eff = 1, True
  elif method == "sketch":
    if probes is None:
      if key is None:
        raise ValueError("method='sketch' needs `probes` (O, R) or a `key` to draw them")
      probes = default_probes(key, o, num_probes)
    probes = jnp.asarray(probes)
    r = probes.shape[1]
    g = lambda p, x: f(p, x) @ probes
    o_eff, trace_eff = r, True
  else:
    o_eff, trace_eff = o, trace
  check_memory(n1, n2, o_eff, num_params(params), chunk, trace_eff, memory_limit)
  scale = o_eff if method == "sketch" else 1  # sketch: sum (not mean) over probes
  if backend == "neural_tangents":
    return scale * _nt_kernel(g, params, x1, None if same else x2, trace_eff, implementation,
                              chunk, dtype)
  if backend != "jax":
    raise ValueError(f"backend={backend!r}: 'jax' or 'neural_tangents'")
  if method == "ntvp":
    return scale * _ntvp_kernel(g, params, x1, x2, trace_eff, dtype)
  return scale * _jacobian_kernel(g, params, x1, x2, trace_eff, chunk, dtype, same)


def default_probes(key, outputs: int, num_probes: int) -> jax.Array:
  """(O, R) probes v ~ N(0, I/(O R)): the sketch is then an unbiased estimate of the traced K."""
  return jax.random.normal(key, (outputs, num_probes)) / math.sqrt(outputs * num_probes)


def _slice(x, a, b):
  return jax.tree_util.tree_map(lambda t: t[a:b], x)


def _jacobian_kernel(g, params, x1, x2, trace, chunk, dtype, same):
  jac = jax.jit(lambda p, x: _flat_jac(g, p, x))
  contract = jax.jit(lambda a, b: _contract(a, b, trace))
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  c1, c2 = _chunks(n1, chunk), _chunks(n2, chunk)
  j2_cache = {} if not same else None
  out = None
  for a0, a1 in c1:
    ja = jac(params, _pad(_slice(x1, a0, a1), chunk))[:a1 - a0]
    for b0, b1 in c2:
      if same and b0 < a0:
        continue
      if same and (b0, b1) == (a0, a1):
        jb = ja
      else:
        if j2_cache is not None and (b0, b1) in j2_cache:
          jb = j2_cache[(b0, b1)]
        else:
          jb = jac(params, _pad(_slice(x2, b0, b1), chunk))[:b1 - b0]
          if j2_cache is not None and len(c1) > 1:
            j2_cache[(b0, b1)] = jb
      block = np.asarray(contract(ja, jb), dtype)
      if out is None:
        out = np.zeros((n1, n2) + block.shape[2:], dtype)
      out[a0:a1, b0:b1] = block
      if same and b0 != a0:
        out[b0:b1, a0:a1] = np.swapaxes(block, 0, 1) if block.ndim == 2 else np.transpose(
            block, (1, 0, 3, 2))
  return out


def _pad(x, chunk):
  """Pads a chunk to `chunk` rows (one compiled shape); callers drop the padded rows."""
  def pad(t):
    n = t.shape[0]
    return t if n == chunk else jnp.concatenate([t, jnp.repeat(t[-1:], chunk - n, 0)])
  return jax.tree_util.tree_map(pad, x)


def ntk_matvec(g: Callable, params, x):
  """v (N, O) -> K v, with K the full NTK of g on x: jvp(vjp(v)), no Jacobian formed."""
  _, vjp = jax.vjp(lambda p: g(p, x), params)

  def mv(v):
    (ct,) = vjp(v)
    return jax.jvp(lambda p: g(p, x), (params,), (ct,))[1]
  return mv


def _ntvp_kernel(g, params, x1, x2, trace, dtype):
  """Columns of K(x1, x2) from NTK-vector products: K e_(j,o) = J1 J2^T e_(j,o)."""
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  y2 = jax.eval_shape(g, params, x2)
  o = y2.shape[1]
  _, vjp2 = jax.vjp(lambda p: g(p, x2), params)

  @jax.jit
  def column(e):
    (ct,) = vjp2(e)
    return jax.jvp(lambda p: g(p, x1), (params,), (ct,))[1]  # (N1, O)
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  full = np.zeros((n1, n2, o, o), dtype)
  for j in range(n2):
    for q in range(o):
      e = jnp.zeros((n2, o)).at[j, q].set(1.0)
      full[:, j, :, q] = np.asarray(column(e), dtype)
  return np.einsum("abii->ab", full) / o if trace else full


def _nt_kernel(g, params, x1, x2, trace, implementation, chunk, dtype):
  del chunk  # neural-tangents vmaps over the whole batch; wrap x in nt.batch for tiling
  from ntk_analysis import nt_backend  # pylint: disable=g-import-not-at-top
  return nt_backend.empirical_ntk(g, params, x1, x2, trace=trace, implementation=implementation,
                                  dtype=dtype)


def multiview_matrix(k) -> np.ndarray:
  """(N, N, V, V) -> the (N V, N V) kernel over (sample, view) pairs, sample-major."""
  k = np.asarray(k)
  n1, n2, v, w = k.shape
  return k.transpose(0, 2, 1, 3).reshape(n1 * v, n2 * w)
