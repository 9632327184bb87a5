"""Empirical NTK K(x1, x2) = J(x1) J(x2)^T over `params` of f(params, x) -> (N, O), configured
once and then called, as neural-tangents' `empirical_ntk_fn`:

    kernel_fn = kernels.ntk_fn(f, method="jacobian", trace=True)
    k = kernel_fn(params, x1, x2)            # float64 host array; x2=None: x1
    k = kernels.empirical_ntk(f, params, x1) # the same in one call

`trace=True` returns the mean over outputs (N1, N2), the neural-tangents convention; `trace=False`
the full (N1, N2, O, O); f -> (N, V, O) (multiview) gives (N1, N2, V, V). Which f to
differentiate (sum of logits, feature sketch, ...) is a readout (readouts.py); per-group kernels
are param_groups.group_ntks. Methods: 'jacobian' (Jacobian contraction on the host) or 'ntvp'
(NTK-vector products, no Jacobian formed). Backends: 'jax' (ours) or 'neural_tangents'.

Memory: the 'jax' Jacobian path holds the Jacobians of one or two panels of `chunk` samples (one
when a joint kernel's panel covers every sample: each Jacobian is then computed exactly once and
K = J J^T is one product). `chunk=None` picks the largest panel whose estimate fits `memory_limit`
(default: half the available memory, at most DEFAULT_MEMORY_CAP). When a traced kernel's single
panel does not fit, the outputs are split into groups instead: K = sum_g (|g|/O) K_g, each K_g
again one pass that computes each Jacobian once (`output_groups` sets the number of groups).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

METHODS = ("jacobian", "ntvp")
MEMORY_FRACTION = 0.5  # of the available memory a kernel may use by default (the rest: others)
# Default budget cap: the README analysis (80 samples, 8 outputs, 754K parameters) then splits
# the fused view's outputs in two and peaks under 4 GB RSS in all, at about the same speed.
DEFAULT_MEMORY_CAP = 3 << 29  # 1.5 GiB
FALLBACK_MEMORY = 4 << 30  # bytes assumed available where the OS does not say
# Samples per compiled Jacobian call: small vmapped batches ran fastest per sample on CPU
# (benchmarks/ntk_profile.py); the panels of `chunk` samples are filled by repeated calls.
JAC_BATCH = 4
CONTRACT_BYTES = 256 << 20  # float64 scratch of the blockwise contraction


class KernelMemoryError(MemoryError):
  """The requested kernel would not fit; the message says what to shrink."""


def num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def available_memory() -> int:
  """Bytes the machine can still give: MemAvailable (capped by a cgroup limit), else psutil."""
  avail = None
  try:
    with open("/proc/meminfo") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
  except OSError:
    pass
  if avail is None:
    try:
      import psutil  # pylint: disable=g-import-not-at-top  # optional, absent on minimal installs
      avail = int(psutil.virtual_memory().available)
    except ImportError:
      avail = FALLBACK_MEMORY
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as fh:
        cap = fh.read().strip()
      if cap.isdigit() and int(cap) < avail:
        used = path.replace("memory.max", "memory.current").replace("limit_in_bytes",
                                                                     "usage_in_bytes")
        with open(used) as fh:
          avail = max(0, int(cap) - int(fh.read().strip()))
    except OSError:
      pass
  return avail


def default_memory_limit() -> int:
  """The budget of a kernel computation when none is given: MEMORY_FRACTION of available_memory,
  at most DEFAULT_MEMORY_CAP."""
  return min(int(available_memory() * MEMORY_FRACTION), DEFAULT_MEMORY_CAP)


def estimate_bytes(n1: int, n2: int, outputs: int, n_params: int, chunk: int,
                   trace: bool, itemsize: int = 4, same: bool = False,
                   activations: int = 0) -> int:
  """Jacobian panels of both inputs (one if `same` and the panel covers all n1), the float64
  kernel, and `activations`: the scratch of one compiled Jacobian call (XLA's own count of its
  temporaries where available, else a rough 2x its output), which is counted, not modelled."""
  c1, c2 = min(chunk, n1), min(chunk, n2)
  rows = c1 if (same and chunk >= n1) else c1 + c2
  jac = rows * outputs * n_params * itemsize
  kern = n1 * n2 * (1 if trace else outputs * outputs) * 8
  return jac + kern + activations


def choose_chunk(n1: int, n2: int, outputs: int, n_params: int, trace: bool, limit: int,
                 itemsize: int = 4, same: bool = False, activations: int = 0) -> Optional[int]:
  """The largest chunk (<= max(n1, n2)) whose estimate_bytes fits `limit`; None if not even 1."""
  fits = lambda c: estimate_bytes(n1, n2, outputs, n_params, c, trace, itemsize, same,
                                  activations) <= limit
  top = n1 if same else max(n1, n2)
  if fits(top):
    return top
  lo, hi = 0, top - 1  # below `top` the estimate grows with the chunk: bisect the last fit
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return lo or None


def check_memory(n1, n2, outputs, n_params, chunk, trace, limit=None, itemsize=4, same=False,
                 activations=0):
  """Bytes needed with `chunk` (None: the largest that fits); KernelMemoryError if over limit."""
  limit = default_memory_limit() if limit is None else limit
  auto = chunk is None
  if auto:
    chunk = choose_chunk(n1, n2, outputs, n_params, trace, limit, itemsize, same, activations)
    if chunk is not None:
      return estimate_bytes(n1, n2, outputs, n_params, chunk, trace, itemsize, same, activations)
    chunk = 1
  need = estimate_bytes(n1, n2, outputs, n_params, chunk, trace, itemsize, same, activations)
  if need > limit:
    what = ("even with chunk 1 (one sample per Jacobian panel)" if auto else
            f"with chunk {chunk}")
    todo = ("" if auto else
            "lower `chunk` (--chunk), or leave it unset to take the largest that fits; ")
    raise KernelMemoryError(
        f"an NTK of {n1}x{n2} samples, {outputs} outputs, {n_params:,} parameters {what} "
        f"needs about {_size(need)} (limit {_size(limit)}): {todo}use fewer "
        f"samples (--n_per_task), fewer outputs (a sketch readout with a few probes (--probes), "
        f"or trace=True), or method='ntvp' (no Jacobian); raise `memory_limit` "
        f"(--memory_limit_gb) if you have the memory")
  return need


def _size(nbytes: int) -> str:
  return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.2f} MiB"


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


def _contract(ja, jb, trace):
  """J_a J_b^T of two (n, O, P) host panels: float32 products over slices of P summed in float64
  (a sum over millions of parameters loses digits in float32); traced: (na, nb) summed (not
  averaged) over outputs; else (na, nb, O, O)."""
  na, o, p = ja.shape
  nb = jb.shape[0]
  if trace:  # only the o = q terms, output by output (the same products whatever the grouping)
    pairs = [(ja[:, i], jb[:, i]) for i in range(o)]
  else:
    pairs = [(ja.reshape(na * o, p), jb.reshape(nb * o, p))]
  step = max(1 << 12, CONTRACT_BYTES // (4 * (pairs[0][0].shape[0] + pairs[0][1].shape[0])))
  step = min(step, 1 << 18)  # float32 sums of at most 2^18 terms, then float64
  acc = np.zeros((pairs[0][0].shape[0], pairs[0][1].shape[0]), np.float64)
  for am, bm in pairs:
    for s in range(0, p, step):
      acc += np.ascontiguousarray(am[:, s:s + step]) @ np.ascontiguousarray(bm[:, s:s + step]).T
  if trace:
    return acc  # the sum over outputs; the caller divides by O
  return acc.reshape(na, o, nb, o).transpose(0, 2, 1, 3)


def _chunks(n, chunk):
  return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def _live_inputs(jaxpr, used=None) -> list:
  """Which inputs of a jaxpr its (used) outputs depend on. Nested jit calls are followed; any
  other primitive counts all its inputs (conservative: a live input may still have zero effect)."""
  var = jax_core.Var
  used = [True] * len(jaxpr.outvars) if used is None else used
  live = {v for v, u in zip(jaxpr.outvars, used) if u and isinstance(v, var)}
  for eqn in reversed(jaxpr.eqns):
    outs = [isinstance(v, var) and v in live for v in eqn.outvars]
    if not any(outs):
      continue
    inner = eqn.params.get("jaxpr")
    if eqn.primitive.name in ("jit", "pjit", "closed_call") and inner is not None:
      ins = _live_inputs(getattr(inner, "jaxpr", inner), outs)
      live.update(v for v, u in zip(eqn.invars, ins) if u and isinstance(v, var))
    else:
      live.update(v for v in eqn.invars if isinstance(v, var))
  return [v in live for v in jaxpr.invars]


def ntk_fn(f: Callable, *, method: str = "jacobian", trace: bool = True,
           chunk: Optional[int] = None, output_groups: Optional[int] = None,
           backend: str = "jax", implementation: int = 1, dtype=np.float32,
           memory_limit: Optional[int] = None, profile: Optional[dict] = None) -> Callable:
  """kernel_fn(params, x1, x2=None) -> the empirical NTK of f between x1 and x2 (float64 host).

  `chunk`: samples per held Jacobian panel (None: the largest whose estimate fits `memory_limit`
  bytes; None: default_memory_limit()). `output_groups`: traced kernels only, the number of
  output groups computed one after the other (None: 1, or the fewest whose single panel fits
  when `chunk` is None). `profile`: a dict that receives the chunk, output groups, parameters
  with a non-zero Jacobian, and compile / Jacobian / contraction seconds. `dtype`: the compute
  dtype (float64 needs `with jax.enable_x64(True):` or jax_enable_x64).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; one of {METHODS} (sum-of-logits and sketches are "
                     "readouts: ntk_analysis.readouts)")
  if backend not in ("jax", "neural_tangents"):
    raise ValueError(f"backend={backend!r}: 'jax' or 'neural_tangents'")
  if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
    raise ValueError(f"dtype={dtype}: float32 or float64")

  def kernel_fn(params, x1, x2=None) -> np.ndarray:
    if np.dtype(dtype) == np.float64:
      if not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs 64-bit JAX: wrap the call in `with "
                         "jax.enable_x64(True):` or set jax.config.update('jax_enable_x64', True)")
      cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
      params, x1 = cast(params), cast(x1)
      x2 = None if x2 is None else cast(x2)
    return _ntk(f, params, x1, x2, method=method, trace=trace, chunk=chunk,
                output_groups=output_groups, backend=backend, implementation=implementation,
                memory_limit=memory_limit, profile=profile)
  return kernel_fn


def empirical_ntk(f: Callable, params, x1, x2=None, **kwargs) -> np.ndarray:
  """ntk_fn(f, **kwargs)(params, x1, x2): one kernel in one call."""
  return ntk_fn(f, **kwargs)(params, x1, x2)


def _ntk(f, params, x1, x2, *, method, trace, chunk, output_groups, backend, implementation,
         memory_limit, profile=None, dtype=np.float64):
  """kernel_fn without the dtype handling."""
  same = x2 is None
  x2 = x1 if same else x2
  n1, n2 = len(jax.tree_util.tree_leaves(x1)[0]), len(jax.tree_util.tree_leaves(x2)[0])
  out_shape = jax.eval_shape(f, params, jax.tree_util.tree_map(lambda a: a[:1], x1)).shape
  if len(out_shape) == 3:  # (B, V, O) views -> (N, N, V, V)
    v, o = out_shape[1:]
    flat = lambda p, x: f(p, x).reshape(-1, v * o)
    full = _ntk(flat, params, x1, None if same else x2, method=method, trace=False, chunk=chunk,
                output_groups=None, backend=backend, implementation=implementation,
                memory_limit=memory_limit, profile=profile, dtype=dtype)
    full = full.reshape(full.shape[:2] + (v, o, v, o))
    return np.einsum("abvowo->abvw", full) / o if trace else full
  if len(out_shape) != 2:
    raise ValueError(f"f(params, x) must return (N, O) or (N, V, O); got shape {out_shape} for "
                     "one sample")
  if backend == "jax" and method == "jacobian":
    return _jacobian_kernel(f, params, x1, x2, trace, chunk, dtype, same, memory_limit, profile,
                            output_groups)
  check_memory(n1, n2, out_shape[1], num_params(params), chunk, trace, memory_limit, same=same)
  if backend == "neural_tangents":
    from ntk_analysis import nt_compat  # pylint: disable=g-import-not-at-top  # optional dep
    return nt_compat.empirical_ntk(f, params, x1, None if same else x2, trace=trace,
                                   implementation=implementation, dtype=dtype)
  return _ntvp_kernel(f, params, x1, x2, trace, dtype)


def _slice(x, a, b):
  return jax.tree_util.tree_map(lambda t: t[a:b], x)


def _split_outputs(o, groups):
  return [np.asarray(i) for i in np.array_split(np.arange(o), groups)]


def _jacobian_kernel(g, params, x1, x2, trace, chunk, dtype, same, memory_limit=None,
                     profile=None, output_groups=None):
  """K from Jacobian panels of `chunk` samples, each filled by compiled calls of JAC_BATCH.

  Parameter leaves g's output does not depend on (e.g. another branch's adapters) have a zero
  Jacobian and are left out. A joint kernel (same) whose panel covers all samples computes every
  Jacobian once; smaller panels recompute the column panels (about n/(2 chunk) times each). A
  traced kernel over output groups sums each group's per-output products, then divides by O.
  """
  prof = {} if profile is None else profile
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  leaves, treedef = jax.tree_util.tree_flatten(params)
  x_one = _slice(x1, 0, 1)
  live = _live_inputs(jax.make_jaxpr(lambda ls: g(treedef.unflatten(ls), x_one))(leaves).jaxpr)
  active = [l for l, u in zip(leaves, live) if u]
  o = jax.eval_shape(g, params, x_one).shape[1]
  p_act = int(sum(np.size(l) for l in active))
  prof.update(P=num_params(params), P_active=p_act, outputs=o, n1=n1, n2=n2)
  kshape = (n1, n2) if trace else (n1, n2, o, o)
  if not active:  # no parameter reaches the output: the kernel is exactly zero
    prof.update(chunk=chunk, output_groups=1, compile_s=0.0, jacobian_s=0.0, contract_s=0.0,
                jacobian_samples=0)
    return np.zeros(kshape, dtype)
  if output_groups is not None and not trace and output_groups != 1:
    raise ValueError("output_groups splits traced kernels only (trace=True)")

  def g_active(act, x):
    it = iter(act)
    return g(treedef.unflatten([next(it) if u else l for l, u in zip(leaves, live)]), x)

  b = min(JAC_BATCH if chunk is None else min(JAC_BATCH, chunk), max(n1, n2))
  itemsize = np.dtype(jnp.result_type(*active)).itemsize
  limit = default_memory_limit() if memory_limit is None else memory_limit
  compiled = {}

  def compile_for(size):
    """The compiled (b, size, P_active) Jacobian of the outputs given as an index argument, and
    its scratch bytes (XLA's count where available)."""
    if size not in compiled:
      t = time.time()
      jac = jax.jit(lambda p, x, i: _flat_jac(lambda q, y: g_active(q, y)[:, i], p, x)).lower(
          active, _pad(_slice(x1, 0, b), b), jnp.arange(size)).compile()
      prof["compile_s"] = prof.get("compile_s", 0.0) + time.time() - t
      try:
        mem = jac.memory_analysis()
        scratch = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
      except Exception:  # pylint: disable=broad-except  # not every backend reports it
        scratch = 2 * b * size * p_act * itemsize
      compiled[size] = (jac, scratch)
    return compiled[size]

  groups = output_groups or 1
  if output_groups is None and chunk is None and trace and o > 1:
    # the fewest output groups whose single panel (each Jacobian computed once) fits; a group
    # size whose panel alone is over the budget is ruled out before compiling it
    top = n1 if same else max(n1, n2)
    for k in range(1, o + 1):
      size = -(-o // k)
      if estimate_bytes(n1, n2, size, p_act, top, trace, itemsize, same) > limit:
        continue
      if estimate_bytes(n1, n2, size, p_act, top, trace, itemsize, same,
                        compile_for(size)[1]) <= limit:
        groups = k
        break
  prof.update(output_groups=groups, jac_batch=b, jacobian_s=0.0, contract_s=0.0,
              jacobian_samples=0, memory_limit=limit)
  out = np.zeros(kshape, np.float64)
  for idx in _split_outputs(o, groups):
    jac, scratch = compile_for(len(idx))
    need = check_memory(n1, n2, len(idx), p_act, chunk, trace, limit, itemsize, same, scratch)
    c = chunk or choose_chunk(n1, n2, len(idx), p_act, trace, limit, itemsize, same, scratch)
    prof.update(chunk=c, estimate_bytes=need, scratch_bytes=scratch)
    call = lambda p, x, jac=jac, i=jnp.asarray(idx): jac(p, x, i)
    _fill(out, call, active, x1, x2, c, b, len(idx), p_act, trace, same, prof)
  return (out / o if trace else out).astype(dtype, copy=False)


def _fill(out, jac, active, x1, x2, chunk, b, o, p_act, trace, same, prof):
  """Adds the panels' contractions (traced: summed over outputs) into `out`."""
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  np_dtype = np.dtype(jnp.result_type(*active))

  def panel(x, a0, a1):
    t0 = time.time()
    res = np.empty((a1 - a0, o, p_act), np_dtype)
    for s in range(a0, a1, b):
      e = min(a1, s + b)
      res[s - a0:e - a0] = np.asarray(jac(active, _pad(_slice(x, s, e), b)))[:e - s]
    prof["jacobian_s"] += time.time() - t0
    prof["jacobian_samples"] += a1 - a0
    return res

  def contract(ja, jb):
    t0 = time.time()
    blk = _contract(ja, jb, trace)
    prof["contract_s"] += time.time() - t0
    return blk

  swap = (lambda k: k.T) if trace else (lambda k: k.transpose(1, 0, 3, 2))
  rows = _chunks(n1, chunk)
  if same:
    for i, (a0, a1) in enumerate(rows):
      ja = panel(x1, a0, a1)
      for b0, b1 in rows[i:]:
        jb = ja if b0 == a0 else panel(x1, b0, b1)
        blk = contract(ja, jb)
        if b0 == a0:  # float32 products need not give J J^T exactly symmetric: make it so
          blk = (blk + swap(blk)) / 2
        out[a0:a1, b0:b1] += blk
        if b0 != a0:
          out[b0:b1, a0:a1] += swap(blk)
        del jb  # at most two panels alive, as estimated
      del ja
    return
  cols = _chunks(n2, chunk)
  j2 = panel(x2, 0, n2) if len(cols) == 1 else None  # one panel: computed once, kept
  for a0, a1 in rows:
    ja = panel(x1, a0, a1)
    for b0, b1 in cols:
      jb = j2 if j2 is not None else panel(x2, b0, b1)
      out[a0:a1, b0:b1] += contract(ja, jb)
      del jb
    del ja


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


def multiview_matrix(k) -> np.ndarray:
  """(N, N, V, V) -> the (N V, N V) kernel over (sample, view) pairs, sample-major."""
  k = np.asarray(k)
  n1, n2, v, w = k.shape
  return k.transpose(0, 2, 1, 3).reshape(n1 * v, n2 * w)
