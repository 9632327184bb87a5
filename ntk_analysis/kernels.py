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

Devices: the 'jax' Jacobian path spreads the samples of every Jacobian call over the devices of a
1-D mesh (`devices`: None is this process's first device, 'all' every device of every process;
with several processes (`jax.distributed`) every process makes the same calls, gathers each
panel, contracts its share of the panel rows on the host and the shares are summed). Each
device runs `jac_batch` samples per call; the host contracts the panels in float64.

Memory: the 'jax' Jacobian path holds the Jacobians of one or two panels of `chunk` samples (one
when a joint kernel's panel covers every sample: each Jacobian is then computed exactly once and
K = J J^T is one product). `chunk=None` picks the largest panel whose estimate fits `memory_limit`
(default: half the available memory, at most DEFAULT_MEMORY_CAP). The estimate counts, per
device, the compiled Jacobian call's arguments, activations (forward and backward temporaries)
and output, from XLA's `memory_analysis()` where the backend reports it, else a formula
(`call_memory_formula`); a call too large for the per-device budget runs fewer samples per device.
When a traced kernel's single panel does not fit, the outputs are split into groups instead:
K = sum_g (|g|/O) K_g, each K_g again one pass that computes each Jacobian once (`output_groups`
sets the number of groups). `log` receives the estimate (`MemoryPlan.describe`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Optional, Sequence, Union

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
DEVICE_MEMORY_FRACTION = 0.8  # of an accelerator's free memory one Jacobian call may use
AXIS = "samples"  # the mesh axis the samples of a Jacobian call are split over


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
  """Host bytes: Jacobian panels of both inputs (one if `same` and the panel covers all n1), the
  float64 kernel, the contraction's contiguous copies of one output's panel slices (traced
  kernels of several outputs: _contract), and `activations`: what the Jacobian calls add on this
  host (MemoryPlan: devices whose memory is the host's (CPU) count their arguments, activations
  and output, and every call's gathered output), which is counted, not modelled."""
  c1, c2 = min(chunk, n1), min(chunk, n2)
  rows = c1 if (same and chunk >= n1) else c1 + c2
  jac = rows * outputs * n_params * itemsize
  kern = n1 * n2 * (1 if trace else outputs * outputs) * 8
  copies = 0
  if trace and outputs > 1:  # ja[:, i] is strided: each slice of P is copied, both panels
    copies = (c1 + c2) * min(n_params, _contract_step(c1, c2, outputs, trace)) * itemsize
  return jac + kern + copies + activations


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


def _contract(ja, jb, trace, step=None):
  """J_a J_b^T of two (n, O, P) host panels: float32 products over slices of P summed in float64
  (a sum over millions of parameters loses digits in float32); traced: (na, nb) summed (not
  averaged) over outputs; else (na, nb, O, O). `step` (parameters per slice) defaults to
  _contract_step of the panels; a share of a panel's rows passes its whole panel's step."""
  na, o, p = ja.shape
  nb = jb.shape[0]
  if trace:  # only the o = q terms, output by output (the same products whatever the grouping)
    pairs = [(ja[:, i], jb[:, i]) for i in range(o)]
  else:
    pairs = [(ja.reshape(na * o, p), jb.reshape(nb * o, p))]
  step = step or _contract_step(na, nb, o, trace)
  acc = np.zeros((pairs[0][0].shape[0], pairs[0][1].shape[0]), np.float64)
  for am, bm in pairs:
    for s in range(0, p, step):
      acc += np.ascontiguousarray(am[:, s:s + step]) @ np.ascontiguousarray(bm[:, s:s + step]).T
  if trace:
    return acc  # the sum over outputs; the caller divides by O
  return acc.reshape(na, o, nb, o).transpose(0, 2, 1, 3)


def _contract_step(na, nb, o, trace):
  rows = (na + nb) * (1 if trace else o)
  step = max(1 << 12, CONTRACT_BYTES // (4 * rows))
  return min(step, 1 << 18)  # float32 sums of at most 2^18 terms, then float64


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


def device_mesh(devices: Union[None, str, Sequence, Mesh] = None) -> Mesh:
  """The 1-D (AXIS,) mesh a kernel's Jacobian calls split their samples over: None -> this
  process's first device, 'all' -> every device of every process, else the given devices (or a
  Mesh's, flattened). A mesh over several processes needs every process to make the same calls."""
  if isinstance(devices, Mesh):
    devices = list(devices.devices.reshape(-1))
  elif devices is None:
    devices = jax.local_devices()[:1]
  elif isinstance(devices, str):
    if devices != "all":
      raise ValueError(f"devices={devices!r}: None, 'all' or a sequence of jax devices")
    devices = jax.devices()
  devices = list(devices)
  if not devices:
    raise ValueError("devices: an empty list; pass None (one device), 'all' or some devices")
  procs = {d.process_index for d in devices}
  if len(procs) > 1 and len(procs) != jax.process_count():
    raise ValueError(f"the kernel's devices span processes {sorted(procs)} of "
                     f"{jax.process_count()}: use this process's devices or those of all processes")
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class CallMemory:
  """Bytes of one compiled Jacobian call on one device: its arguments (parameters, its samples),
  temporaries (the forward and backward activations) and output (its Jacobian rows)."""
  arguments: int
  temp: int
  output: int
  source: str  # 'xla' (Compiled.memory_analysis) or 'formula' (call_memory_formula)

  @property
  def total(self) -> int:
    return self.arguments + self.temp + self.output


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """What one kernel holds: per device, a Jacobian call of `batch` samples (`call`); on the host,
  panels of `chunk` samples, the float64 kernel and the calls' scratch (`host_scratch`)."""
  devices: int
  local_devices: int
  batch: int
  call: CallMemory
  device_limit: int
  chunk: int
  host_scratch: int
  host_total: int
  host_limit: int
  outputs: int
  params: int

  def describe(self) -> str:
    c = self.call
    return (f"NTK memory: {self.devices} device(s) x {self.batch} sample(s) per Jacobian call of "
            f"{self.outputs} outputs x {self.params:,} parameters: {_size(c.total)} per device "
            f"({c.source}: arguments {_size(c.arguments)}, activations {_size(c.temp)}, output "
            f"{_size(c.output)}; budget {_size(self.device_limit)}); host: panels of "
            f"{self.chunk} samples + kernel + call scratch {_size(self.host_scratch)} = "
            f"{_size(self.host_total)} (budget {_size(self.host_limit)})")


def _aval_bytes(v) -> int:
  aval = getattr(v, "aval", None)
  shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0
  try:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  except TypeError:  # extended dtypes (PRNG keys)
    return 0


def _jaxpr_bytes(jaxpr) -> tuple:
  """(sum, max) of the bytes of every intermediate of a jaxpr, nested jaxprs included: what a
  forward pass may keep for its backward pass, and its largest single value."""
  total, top = 0, 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      b = _aval_bytes(v)
      total, top = total + b, max(top, b)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", None)
        inner = sub if isinstance(sub, jax_core.Jaxpr) else inner
        if isinstance(inner, jax_core.Jaxpr):
          t, m = _jaxpr_bytes(inner)
          total, top = total + t, max(top, m)
  return total, top


def call_memory_formula(g, params, x_one, batch: int, outputs: int, p_active: int,
                        itemsize: int, arg_bytes: int) -> CallMemory:
  """CallMemory where XLA does not report one: per sample, every forward intermediate of g (kept
  for the backward pass) plus, for the backward pass of all `outputs` at once, two cotangents of
  the largest intermediate per output; the output is batch x outputs x p_active values."""
  fwd, top = _jaxpr_bytes(jax.make_jaxpr(g)(params, x_one).jaxpr)
  return CallMemory(arguments=int(arg_bytes), temp=int(batch * (fwd + 2 * outputs * top)),
                    output=int(batch * outputs * p_active * itemsize), source="formula")


def device_memory_limit(device, host_limit: int, local_devices: int) -> int:
  """Per-device budget of one Jacobian call: CPU devices share the host's memory, so each gets
  its share of the host budget; an accelerator DEVICE_MEMORY_FRACTION of its free memory where
  it reports it (memory_stats), else the host budget."""
  if device.platform == "cpu":
    return host_limit // max(1, local_devices)
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    stats = {}
  if "bytes_limit" in stats:
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return int(max(0, free) * DEVICE_MEMORY_FRACTION)
  return host_limit


def ntk_fn(f: Callable, *, method: str = "jacobian", trace: bool = True,
           chunk: Optional[int] = None, output_groups: Optional[int] = None,
           backend: str = "jax", implementation: int = 1, dtype=np.float32,
           memory_limit: Optional[int] = None, profile: Optional[dict] = None,
           devices: Union[None, str, Sequence, Mesh] = None, jac_batch: Optional[int] = None,
           log: Optional[Callable[[str], None]] = None) -> Callable:
  """kernel_fn(params, x1, x2=None) -> the empirical NTK of f between x1 and x2 (float64 host).

  `chunk`: samples per held Jacobian panel (None: the largest whose estimate fits `memory_limit`
  bytes; None: default_memory_limit()). `output_groups`: traced kernels only, the number of
  output groups computed one after the other (None: 1, or the fewest whose single panel fits
  when `chunk` is None). `devices` (method 'jacobian', backend 'jax'): the devices each Jacobian
  call splits its samples over (device_mesh); `jac_batch`: samples per device per call (None:
  JAC_BATCH, fewer if the per-device budget asks). `profile`: a dict that receives the chunk,
  output groups, parameters with a non-zero Jacobian, the memory plan and compile / Jacobian /
  contraction seconds. `log` receives the memory estimate whenever the plan changes. `dtype`:
  the compute dtype (float64 needs `with jax.enable_x64(True):` or jax_enable_x64).

  kernel_fn keeps its compiled Jacobian calls: calls with parameters and inputs of the same
  shapes (e.g. the checkpoints of one task) compile once.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; one of {METHODS} (sum-of-logits and sketches are "
                     "readouts: ntk_analysis.readouts)")
  if backend not in ("jax", "neural_tangents"):
    raise ValueError(f"backend={backend!r}: 'jax' or 'neural_tangents'")
  if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
    raise ValueError(f"dtype={dtype}: float32 or float64")
  if jac_batch is not None and jac_batch < 1:
    raise ValueError(f"jac_batch={jac_batch}: at least 1 sample per device per call")
  mesh = device_mesh(devices)
  cache = {"log": log}

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
                memory_limit=memory_limit, profile=profile, mesh=mesh, jac_batch=jac_batch,
                cache=cache)
  return kernel_fn


def empirical_ntk(f: Callable, params, x1, x2=None, **kwargs) -> np.ndarray:
  """ntk_fn(f, **kwargs)(params, x1, x2): one kernel in one call."""
  return ntk_fn(f, **kwargs)(params, x1, x2)


def _ntk(f, params, x1, x2, *, method, trace, chunk, output_groups, backend, implementation,
         memory_limit, profile=None, dtype=np.float64, mesh=None, jac_batch=None, cache=None):
  """kernel_fn without the dtype handling."""
  mesh = device_mesh() if mesh is None else mesh
  cache = {} if cache is None else cache
  same = x2 is None
  x2 = x1 if same else x2
  n1, n2 = len(jax.tree_util.tree_leaves(x1)[0]), len(jax.tree_util.tree_leaves(x2)[0])
  out_shape = jax.eval_shape(f, params, jax.tree_util.tree_map(lambda a: a[:1], x1)).shape
  if len(out_shape) == 3:  # (B, V, O) views -> (N, N, V, V)
    v, o = out_shape[1:]
    flat = cache.setdefault(("views", id(f), v, o), lambda p, x: f(p, x).reshape(-1, v * o))
    full = _ntk(flat, params, x1, None if same else x2, method=method, trace=False, chunk=chunk,
                output_groups=None, backend=backend, implementation=implementation,
                memory_limit=memory_limit, profile=profile, dtype=dtype, mesh=mesh,
                jac_batch=jac_batch, cache=cache)
    full = full.reshape(full.shape[:2] + (v, o, v, o))
    return np.einsum("abvowo->abvw", full) / o if trace else full
  if len(out_shape) != 2:
    raise ValueError(f"f(params, x) must return (N, O) or (N, V, O); got shape {out_shape} for "
                     "one sample")
  if backend == "jax" and method == "jacobian":
    return _jacobian_kernel(f, params, x1, x2, trace, chunk, dtype, same, memory_limit, profile,
                            output_groups, mesh=mesh, jac_batch=jac_batch, cache=cache)
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


def _avals(tree) -> tuple:
  return tuple((tuple(np.shape(l)), str(jnp.result_type(l)))
               for l in jax.tree_util.tree_leaves(tree))


def _put(tree, sharding):
  """Host values -> global arrays of `sharding`; every process passes the whole value and
  supplies the shards of its own devices (one process: a plain device_put)."""
  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
  return jax.tree_util.tree_map(one, tree)


def _to_host(a) -> np.ndarray:
  """A global array -> the whole value on this host (gathered from every process if need be)."""
  if a.is_fully_addressable:
    return np.asarray(a)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def _sum_over_processes(a: np.ndarray) -> np.ndarray:
  """The sum of every process's float64 `a`, in process order (bit patterns travel as uint32, so
  no float64 is cast down where 64-bit JAX is off)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  bits = np.ascontiguousarray(a, np.float64).view(np.uint32)
  parts = np.asarray(multihost_utils.process_allgather(bits))
  out = np.zeros_like(a, np.float64)
  for p in range(parts.shape[0]):
    out += np.ascontiguousarray(parts[p]).view(np.float64).reshape(a.shape)
  return out


def _jacobian_kernel(g, params, x1, x2, trace, chunk, dtype, same, memory_limit=None,
                     profile=None, output_groups=None, mesh=None, jac_batch=None, cache=None):
  """K from Jacobian panels of `chunk` samples, each filled by compiled calls of `jac_batch`
  samples on each device of `mesh`.

  Parameter leaves g's output does not depend on (e.g. another branch's adapters) have a zero
  Jacobian and are left out. A joint kernel (same) whose panel covers all samples computes every
  Jacobian once; smaller panels recompute the column panels (about n/(2 chunk) times each). A
  traced kernel over output groups sums each group's per-output products, then divides by O.
  """
  prof = {} if profile is None else profile
  mesh = device_mesh() if mesh is None else mesh
  cache = {} if cache is None else cache
  x1 = jax.tree_util.tree_map(np.asarray, x1)
  x2 = x1 if same else jax.tree_util.tree_map(np.asarray, x2)
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  leaves, treedef = jax.tree_util.tree_flatten(params)
  x_one = _slice(x1, 0, 1)
  key = (id(g), treedef, _avals(leaves), _avals(x_one))
  if ("live",) + key not in cache:  # which leaves reach the output: the function's, not the values'
    jaxpr = jax.make_jaxpr(lambda ls: g(treedef.unflatten(ls), x_one))(leaves).jaxpr
    cache[("live",) + key] = _live_inputs(jaxpr)
  live = cache[("live",) + key]
  active = [l for l, u in zip(leaves, live) if u]
  inactive = [l for l, u in zip(leaves, live) if not u]
  o = jax.eval_shape(g, params, x_one).shape[1]
  p_act = int(sum(np.size(l) for l in active))
  devs = mesh.devices.reshape(-1)
  n_dev = len(devs)
  local = [d for d in devs if d.process_index == jax.process_index()]
  procs = sorted({d.process_index for d in devs})
  share = (procs.index(jax.process_index()), len(procs))  # this process's share of the rows
  prof.update(P=num_params(params), P_active=p_act, outputs=o, n1=n1, n2=n2, devices=n_dev,
              processes=len(procs))
  kshape = (n1, n2) if trace else (n1, n2, o, o)
  if not active:  # no parameter reaches the output: the kernel is exactly zero
    prof.update(chunk=chunk, output_groups=1, compile_s=0.0, jacobian_s=0.0, contract_s=0.0,
                jacobian_samples=0)
    return np.zeros(kshape, dtype)
  if output_groups is not None and not trace and output_groups != 1:
    raise ValueError("output_groups splits traced kernels only (trace=True)")

  def g_split(act, inact, x):
    a, i = iter(act), iter(inact)
    return g(treedef.unflatten([next(a) if u else next(i) for u in live]), x)

  top = max(n1, n2)
  b0 = JAC_BATCH if jac_batch is None else jac_batch
  b0 = max(1, min(b0 if chunk is None else min(b0, chunk), -(-top // n_dev)))
  itemsize = np.dtype(jnp.result_type(*active)).itemsize
  limit = default_memory_limit() if memory_limit is None else memory_limit
  dev_limit = device_memory_limit(local[0], limit, len(local))
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  x_spec = jax.tree_util.tree_map(
      lambda t: jax.ShapeDtypeStruct((0,) + t.shape[1:], t.dtype), x1)
  arg_spec = lambda ls: [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l), sharding=rep)
                         for l in ls]

  def compile_for(size, b):
    """The compiled Jacobian call of b samples per device, outputs given by an index argument of
    `size` entries, and its CallMemory on one device."""
    ck = ("jac",) + key + (size, b, tuple(d.id for d in devs))
    if ck not in cache:
      t = time.time()

      def body(act, inact, x, idx):  # one device: its b samples
        return _flat_jac(lambda q, y: g_split(q, inact, y)[:, idx], act, x)
      fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(AXIS), P()),
                                 out_specs=P(AXIS), check_vma=False),
                   in_shardings=(rep, rep, rows, rep), out_shardings=rows)
      xs = jax.tree_util.tree_map(
          lambda t: jax.ShapeDtypeStruct((b * n_dev,) + t.shape[1:], t.dtype, sharding=rows),
          x_spec)
      jac = fn.lower(arg_spec(active), arg_spec(inactive), xs,
                     jax.ShapeDtypeStruct((size,), jnp.int32, sharding=rep)).compile()
      prof["compile_s"] = prof.get("compile_s", 0.0) + time.time() - t
      try:
        m = jac.memory_analysis()
        mem = CallMemory(arguments=int(m.argument_size_in_bytes),
                         temp=int(m.temp_size_in_bytes), output=int(m.output_size_in_bytes),
                         source="xla")
      except Exception:  # pylint: disable=broad-except  # not every backend reports it
        arg_bytes = sum(np.size(l) * jnp.result_type(l).itemsize for l in leaves) + b * sum(
            np.size(t) * t.dtype.itemsize for t in jax.tree_util.tree_leaves(x_one))
        mem = call_memory_formula(lambda p, x: g(p, x)[:, :size], params, x_one, b, size,
                                  p_act, itemsize, arg_bytes)
      cache[ck] = (jac, mem)
    return cache[ck]

  def host_scratch(size, b, mem):
    """What the calls add on this host: CPU devices' own memory, and each call's gathered
    output (b x devices rows of size x P_active values)."""
    on_host = len(local) * mem.total if local[0].platform == "cpu" else 0
    return on_host + b * n_dev * size * p_act * itemsize

  def plan_for(size):
    """(compiled call, CallMemory, samples per device) of `size` outputs: JAC_BATCH samples per
    device, halved while one device's call exceeds its budget."""
    b = b0
    while True:
      jac, mem = compile_for(size, b)
      if mem.total <= dev_limit or b == 1:
        break
      b = max(1, b // 2)
    if mem.total > dev_limit and local[0].platform != "cpu":
      raise KernelMemoryError(
          f"one Jacobian call of 1 sample, {size} outputs and {p_act:,} parameters needs "
          f"{_size(mem.total)} per device ({mem.source}; activations {_size(mem.temp)}), over "
          f"the device budget {_size(dev_limit)}: use fewer outputs (a sketch readout with fewer "
          f"probes (--probes), or output_groups) or a smaller model input")
    return jac, mem, b

  groups = output_groups or 1
  if output_groups is None and chunk is None and trace and o > 1:
    # the fewest output groups whose single panel (each Jacobian computed once) fits; a group
    # size whose panel alone is over the budget is ruled out before compiling it
    full = n1 if same else top
    for k in range(1, o + 1):
      size = -(-o // k)
      if estimate_bytes(n1, n2, size, p_act, full, trace, itemsize, same) > limit:
        continue
      _, mem, b = plan_for(size)
      if estimate_bytes(n1, n2, size, p_act, full, trace, itemsize, same,
                        host_scratch(size, b, mem)) <= limit:
        groups = k
        break
  prof.update(output_groups=groups, jacobian_s=0.0, contract_s=0.0, jacobian_samples=0,
              memory_limit=limit, device_memory_limit=dev_limit)
  out = np.zeros(kshape, np.float64)
  for idx in _split_outputs(o, groups):
    if estimate_bytes(n1, n2, len(idx), p_act, 1, trace, itemsize, same) > limit:
      check_memory(n1, n2, len(idx), p_act, chunk, trace, limit, itemsize, same)  # raises
    jac, mem, b = plan_for(len(idx))
    scratch = host_scratch(len(idx), b, mem)
    need = check_memory(n1, n2, len(idx), p_act, chunk, trace, limit, itemsize, same, scratch)
    c = chunk or choose_chunk(n1, n2, len(idx), p_act, trace, limit, itemsize, same, scratch)
    plan = MemoryPlan(devices=n_dev, local_devices=len(local), batch=b, call=mem,
                      device_limit=dev_limit, chunk=c, host_scratch=scratch, host_total=need,
                      host_limit=limit, outputs=len(idx), params=p_act)
    prof.update(chunk=c, estimate_bytes=need, scratch_bytes=scratch, jac_batch=b,
                device_bytes=mem.total, device_activation_bytes=mem.temp,
                device_bytes_source=mem.source, memory_plan=plan.describe())
    if cache.get("log") and cache.get("last_plan") != plan:
      cache["log"](plan.describe())
    cache["last_plan"] = plan
    act_dev, inact_dev = _put(active, rep), _put(inactive, rep)
    idx_dev = _put(np.asarray(idx, np.int32), rep)
    call = lambda x, jac=jac: jac(act_dev, inact_dev, _put(x, rows), idx_dev)
    part = np.zeros(kshape, np.float64)
    diag = _fill(part, call, x1, x2, c, b * n_dev, len(idx), p_act, trace, same, prof, share,
                 np.dtype(jnp.result_type(*active)))
    if share[1] > 1:
      part = _sum_over_processes(part)
    swap = (lambda k: k.T) if trace else (lambda k: k.transpose(1, 0, 3, 2))
    for a0, a1 in diag:  # float32 products need not give J J^T exactly symmetric: make it so
      blk = part[a0:a1, a0:a1]
      part[a0:a1, a0:a1] = (blk + swap(blk)) / 2
    out += part
  return (out / o if trace else out).astype(dtype, copy=False)


def _fill(out, call, x1, x2, chunk, step, o, p_act, trace, same, prof, share=(0, 1),
          np_dtype=np.float32) -> list:
  """Adds the panels' contractions (traced: summed over outputs) into `out`: the panels are
  filled by `call` (step samples at a time, over every device); this process contracts its
  `share` (index, count) of each block's rows. Returns the diagonal blocks of a joint kernel,
  which the caller symmetrises once the shares are summed."""
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])

  def panel(x, a0, a1):
    t0 = time.time()
    res = np.empty((a1 - a0, o, p_act), np_dtype)
    for s in range(a0, a1, step):
      e = min(a1, s + step)
      res[s - a0:e - a0] = _to_host(call(_pad(_slice(x, s, e), step)))[:e - s]
    prof["jacobian_s"] += time.time() - t0
    prof["jacobian_samples"] += a1 - a0
    return res

  def contract(ja, jb, a0, a1):
    """(rows of this share, block rows a0:a1 relative) of ja jb^T; (r0, r1) absolute."""
    t0 = time.time()
    part = np.array_split(np.arange(a0, a1), share[1])[share[0]]
    r0, r1 = (int(part[0]), int(part[-1]) + 1) if len(part) else (a0, a0)
    blk = _contract(ja[r0 - a0:r1 - a0], jb, trace, _contract_step(a1 - a0, len(jb), o, trace))
    prof["contract_s"] += time.time() - t0
    return blk, r0, r1

  swap = (lambda k: k.T) if trace else (lambda k: k.transpose(1, 0, 3, 2))
  rows = _chunks(n1, chunk)
  if same:
    for i, (a0, a1) in enumerate(rows):
      ja = panel(x1, a0, a1)
      for b0, b1 in rows[i:]:
        jb = ja if b0 == a0 else panel(x1, b0, b1)
        blk, r0, r1 = contract(ja, jb, a0, a1)
        out[r0:r1, b0:b1] += blk
        if b0 != a0:
          out[b0:b1, r0:r1] += swap(blk)
        del jb  # at most two panels alive, as estimated
      del ja
    return rows
  cols = _chunks(n2, chunk)
  j2 = panel(x2, 0, n2) if len(cols) == 1 else None  # one panel: computed once, kept
  for a0, a1 in rows:
    ja = panel(x1, a0, a1)
    for b0, b1 in cols:
      jb = j2 if j2 is not None else panel(x2, b0, b1)
      blk, r0, r1 = contract(ja, jb, a0, a1)
      out[r0:r1, b0:b1] += blk
      del jb
    del ja
  return []


def _pad(x, chunk):
  """Pads a chunk of host rows to `chunk` rows (one compiled shape); callers drop the padded
  rows."""
  def pad(t):
    n = t.shape[0]
    return t if n == chunk else np.concatenate([t, np.repeat(t[-1:], chunk - n, 0)])
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
