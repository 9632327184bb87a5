"""Empirical NTK K(x1, x2) = J(x1) J(x2)^T over `params` of f(params, x) -> (N, O), configured
once and then called, as neural-tangents' `empirical_ntk_fn`:

    kernel_fn = kernels.ntk_fn(f, method="jacobian", trace=True)
    k = kernel_fn(params, x1, x2)            # float64 host array; x2=None: x1
    k = kernels.empirical_ntk(f, params, x1) # the same in one call

`trace=True` returns the mean over outputs (N1, N2), the neural-tangents convention; `trace=False`
the full (N1, N2, O, O); f -> (N, V, O) (multiview) gives (N1, N2, V, V). Which f to
differentiate (sum of logits, feature sketch, ...) is a readout (readouts.py); per-group kernels
are param_groups.group_ntks. Methods: 'jacobian' (Jacobian contraction) or 'ntvp'
(NTK-vector products, no Jacobian formed). Backends: 'jax' (ours) or 'neural_tangents'.

Devices: the 'jax' Jacobian path spreads the samples of every Jacobian call over the devices of a
1-D mesh (`devices`: None is this process's first device, 'all' every device of every process;
with several processes (`jax.distributed`) every process makes the same calls). Each device runs
`jac_batch` samples per call; any sample count works on any device count (the last call is
padded and its padded rows dropped). Where J J^T is computed (`contract`):
  'host'    each call's Jacobian rows come to the host (every process receives every row), each
            process contracts its share of a panel's rows in float64 and the shares are summed;
            the default on CPU.
  'device'  the panels stay on the devices, split over them by samples; each device contracts
            its rows against the column panel's rows as they circulate round the mesh
            (ppermute), float32 products over parameter slices summed with Kahan compensation
            (float64 Jacobians: float64), and only the finished kernel blocks come to the host
            (and are what the processes exchange); the default on accelerators, which have no
            float64 by default.
The 'ntvp' path splits its columns (K e_j for one output of one sample) over the devices.
`profile` receives the bytes brought to this host per kernel (`host_bytes`: Jacobian rows,
`host_bytes_rows`, and kernel blocks, `host_bytes_blocks`: the device path's blocks, or the host
path's per-process kernel parts) and the seconds (`kernel_s`); `log` receives progress lines
(`panels i/n`, elapsed, ETA) at most every PROGRESS_SECONDS, and the last.

Precision: the Jacobian calls are traced at `matmul_precision` ('highest': float32 products in
full float32 on TPUs and GPUs too) wherever f does not set its own, and the device contraction's
products run at HIGHEST. A run's readout computes in its learner's policy: load the run with
ntkcl_jax.checkpoints.runs.load_run(..., compute='float32'), the default, for float32.

Memory: the 'jax' Jacobian path holds the Jacobians of one or two panels of `chunk` samples (one
when a joint kernel's panel covers every sample: each Jacobian is then computed exactly once and
K = J J^T is one product). `chunk=None` picks the largest panel whose estimate fits `memory_limit`
(default: half the available memory, at most DEFAULT_MEMORY_CAP). The estimate (kernel_memory)
counts, per device, the compiled Jacobian call's arguments, activations (forward and backward
temporaries) and output, from XLA's `memory_analysis()` where the backend reports it, else a
formula (`call_memory_formula`); a call too large for the per-device budget runs fewer samples
per device. When a traced kernel's single panel does not fit, the outputs are split into groups
instead: K = sum_g (|g|/O) K_g, each K_g again one pass that computes each Jacobian once
(`output_groups` sets the number of groups). `log` receives the estimate (`MemoryPlan.describe`).
The device contraction plans the same way with its own estimate (kernel_memory.device_estimate:
per device its panels, contraction buffers and Jacobian call; on the host the kernel and the
gathered blocks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence, Union

import jax
from jax import lax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ntk_analysis import kernel_memory

METHODS = ("jacobian", "ntvp")
# Samples per compiled Jacobian call: small vmapped batches ran fastest per sample on CPU
# (benchmarks/ntk_profile.py); the panels of `chunk` samples are filled by repeated calls.
JAC_BATCH = 4
AXIS = "samples"  # the mesh axis the samples of a Jacobian call are split over
CONTRACTS = ("auto", "host", "device")
PROGRESS_SECONDS = 5.0  # at most one progress line per this many seconds (and the last)


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
  kernel_memory.contract_step of the panels; a share of a panel's rows passes its whole panel's
  step."""
  na, o, p = ja.shape
  nb = jb.shape[0]
  if trace:  # only the o = q terms, output by output (the same products whatever the grouping)
    pairs = [(ja[:, i], jb[:, i]) for i in range(o)]
  else:
    pairs = [(ja.reshape(na * o, p), jb.reshape(nb * o, p))]
  step = step or kernel_memory.contract_step(na, nb, o, trace)
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
                     f"{jax.process_count()}: use this process's devices or those of all "
                     "processes")
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def ntk_fn(f: Callable, *, method: str = "jacobian", trace: bool = True,
           chunk: Optional[int] = None, output_groups: Optional[int] = None,
           backend: str = "jax", implementation: int = 1, dtype=np.float32,
           memory_limit: Optional[int] = None, profile: Optional[dict] = None,
           devices: Union[None, str, Sequence, Mesh] = None, jac_batch: Optional[int] = None,
           log: Optional[Callable[[str], None]] = None, contract: str = "auto",
           progress: bool = False, matmul_precision: Optional[str] = "highest") -> Callable:
  """kernel_fn(params, x1, x2=None) -> the empirical NTK of f between x1 and x2 (float64 host).

  `chunk`: samples per held Jacobian panel (None: the largest whose estimate fits `memory_limit`
  bytes; None: kernel_memory.default_memory_limit()). `output_groups`: traced kernels only, the
  number of output groups computed one after the other (None: 1, or the fewest whose single panel
  fits when `chunk` is None). `devices` (method 'jacobian', backend 'jax'): the devices each
  Jacobian call splits its samples over (device_mesh); `jac_batch`: samples per device per call
  (None: JAC_BATCH, fewer if the per-device budget asks; method 'ntvp': columns per device per
  call, None: 1). `contract` (method 'jacobian', backend 'jax'): where J J^T is computed, 'host'
  (float64 on the host), 'device' (on the mesh, Kahan-compensated float32) or 'auto' (host on
  CPU devices, device elsewhere). `profile`: a dict that receives the chunk, output groups,
  parameters with a non-zero Jacobian, the memory plan, the contraction used, the bytes brought
  to the host (`host_bytes`) and compile / Jacobian / contraction / whole-kernel seconds. `log`
  receives the memory estimate whenever the plan changes and progress lines (panels done of
  total, elapsed, ETA; at most one per PROGRESS_SECONDS, and the last); `progress=True` also
  shows a tqdm bar. `matmul_precision`: the JAX matmul precision f is traced at where it sets
  none itself (None: JAX's default). `dtype`: the compute dtype (float64 needs `with
  jax.enable_x64(True):` or jax_enable_x64).

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
  if contract not in CONTRACTS:
    raise ValueError(f"contract={contract!r}: one of {CONTRACTS}")
  mesh = device_mesh(devices)
  cache = {"log": log, "progress": progress}
  contract = _resolve_contract(contract, mesh)

  def kernel_fn(params, x1, x2=None) -> np.ndarray:
    if np.dtype(dtype) == np.float64:
      if not jax.config.jax_enable_x64:
        raise ValueError("dtype=float64 needs 64-bit JAX: wrap the call in `with "
                         "jax.enable_x64(True):` or set jax.config.update('jax_enable_x64', True)")
      cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
      params, x1 = cast(params), cast(x1)
      x2 = None if x2 is None else cast(x2)
    prof = {} if profile is None else profile
    how = contract if method == "jacobian" else method  # 'host', 'device' or 'ntvp'
    prof.update(contract=how if backend == "jax" else backend, host_bytes=0, host_bytes_rows=0,
                host_bytes_blocks=0)
    t0 = time.time()
    with _precision(matmul_precision):
      out = _ntk(f, params, x1, x2, method=method, trace=trace, chunk=chunk,
                 output_groups=output_groups, backend=backend, implementation=implementation,
                 memory_limit=memory_limit, profile=prof, mesh=mesh, jac_batch=jac_batch,
                 cache=cache, contract=contract)
    prof["kernel_s"] = time.time() - t0
    return out
  return kernel_fn


def _resolve_contract(contract: str, mesh: Mesh) -> str:
  """'host' or 'device' of a `contract` option: 'auto' is host on CPU devices, else device."""
  if contract != "auto":
    return contract
  return "host" if mesh.devices.reshape(-1)[0].platform == "cpu" else "device"


def _precision(precision: Optional[str]):
  """Context tracing matmuls at `precision` (None: JAX's default, no context)."""
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def empirical_ntk(f: Callable, params, x1, x2=None, **kwargs) -> np.ndarray:
  """ntk_fn(f, **kwargs)(params, x1, x2): one kernel in one call."""
  return ntk_fn(f, **kwargs)(params, x1, x2)


def _ntk(f, params, x1, x2, *, method, trace, chunk, output_groups, backend, implementation,
         memory_limit, profile=None, dtype=np.float64, mesh=None, jac_batch=None, cache=None,
         contract="host"):
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
                jac_batch=jac_batch, cache=cache, contract=contract)
    full = full.reshape(full.shape[:2] + (v, o, v, o))
    return np.einsum("abvowo->abvw", full) / o if trace else full
  if len(out_shape) != 2:
    raise ValueError(f"f(params, x) must return (N, O) or (N, V, O); got shape {out_shape} for "
                     "one sample")
  if backend == "jax" and method == "jacobian":
    return _jacobian_kernel(f, params, x1, x2, trace, chunk, dtype, same, memory_limit, profile,
                            output_groups, mesh=mesh, jac_batch=jac_batch, cache=cache,
                            contract=contract)
  kernel_memory.check_memory(n1, n2, out_shape[1], kernel_memory.num_params(params), chunk,
                             trace, memory_limit, same=same)
  if backend == "neural_tangents":
    from ntk_analysis import nt_compat  # pylint: disable=g-import-not-at-top  # optional dep
    return nt_compat.empirical_ntk(f, params, x1, None if same else x2, trace=trace,
                                   implementation=implementation, dtype=dtype)
  return _ntvp_kernel(f, params, x1, x2, trace, dtype, mesh, jac_batch, profile, cache)


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


def _fetch(a, prof: dict, kind: str) -> np.ndarray:
  """_to_host, counting the bytes brought to this host under `host_bytes` and `host_bytes_` +
  kind ('rows': Jacobian rows, 'blocks': kernel blocks)."""
  out = _to_host(a)
  prof["host_bytes"] = prof.get("host_bytes", 0) + out.nbytes
  prof["host_bytes_" + kind] = prof.get("host_bytes_" + kind, 0) + out.nbytes
  return out


def _sum_over_processes(a: np.ndarray, prof: Optional[dict] = None) -> np.ndarray:
  """The sum of every process's float64 `a`, in process order (bit patterns travel as uint32, so
  no float64 is cast down where 64-bit JAX is off); `prof` counts the parts received as kernel
  blocks."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  bits = np.ascontiguousarray(a, np.float64).view(np.uint32)
  parts = np.asarray(multihost_utils.process_allgather(bits))
  if prof is not None:
    prof["host_bytes"] = prof.get("host_bytes", 0) + parts.nbytes
    prof["host_bytes_blocks"] = prof.get("host_bytes_blocks", 0) + parts.nbytes
  out = np.zeros_like(a, np.float64)
  for p in range(parts.shape[0]):
    out += np.ascontiguousarray(parts[p]).view(np.float64).reshape(a.shape)
  return out


def _jacobian_kernel(g, params, x1, x2, trace, chunk, dtype, same, memory_limit=None,
                     profile=None, output_groups=None, mesh=None, jac_batch=None, cache=None,
                     contract="host"):
  """K from Jacobian panels of `chunk` samples, each filled by compiled calls of `jac_batch`
  samples on each device of `mesh`.

  Parameter leaves g's output does not depend on (e.g. another branch's adapters) have a zero
  Jacobian and are left out. A joint kernel (same) whose panel covers all samples computes every
  Jacobian once; smaller panels recompute the column panels (about n/(2 chunk) times each). A
  traced kernel over output groups sums each group's per-output products, then divides by O.
  `contract`: 'host' or 'device' (ntk_fn).
  """
  prof = {} if profile is None else profile
  mesh = device_mesh() if mesh is None else mesh
  cache = {} if cache is None else cache
  x1 = jax.tree_util.tree_map(np.asarray, x1)
  x2 = x1 if same else jax.tree_util.tree_map(np.asarray, x2)
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  calls = _JacobianCalls.create(g, params, x1, mesh, prof, cache, contract)
  o = jax.eval_shape(g, params, calls.x_one).shape[1]
  prof.update(P=kernel_memory.num_params(params), P_active=calls.p_act, outputs=o, n1=n1, n2=n2,
              devices=calls.n_dev, processes=calls.share[1])
  kshape = (n1, n2) if trace else (n1, n2, o, o)
  if not calls.active:  # no parameter reaches the output: the kernel is exactly zero
    prof.update(chunk=chunk, output_groups=1, compile_s=0.0, jacobian_s=0.0, contract_s=0.0,
                jacobian_samples=0)
    return np.zeros(kshape, dtype)
  if output_groups is not None and not trace and output_groups != 1:
    raise ValueError("output_groups splits traced kernels only (trace=True)")
  calls = calls.with_budget(memory_limit, chunk, max(n1, n2), jac_batch)
  groups = output_groups or 1
  if output_groups is None and chunk is None and trace and o > 1:
    groups = _fewest_output_groups(calls, n1, n2, o, trace, same)
  prof.update(output_groups=groups, jacobian_s=0.0, contract_s=0.0, jacobian_samples=0,
              memory_limit=calls.limit, device_memory_limit=calls.dev_limit)
  plans = [(idx, _plan_group(calls, len(idx), n1, n2, chunk, trace, same))
           for idx in _split_outputs(o, groups)]
  prog = _Progress.start(sum(_num_blocks(n1, n2, plan[2], same) for _, plan in plans),
                         "panels", cache)
  out = np.zeros(kshape, np.float64)
  for idx, plan in plans:
    out += _group_kernel(calls, idx, plan, x1, x2, kshape, trace, same, prog)
  prog.close()
  return (out / o if trace else out).astype(dtype, copy=False)


def _num_blocks(n1, n2, chunk, same) -> int:
  """Kernel blocks (a row panel against a column panel) of a kernel with panels of `chunk`."""
  rows = -(-n1 // chunk)
  return rows * (rows + 1) // 2 if same else rows * -(-n2 // chunk)


@dataclasses.dataclass(eq=False)
class _Progress:
  """Units done of a kernel's total: a line to `log` at most every PROGRESS_SECONDS and at the
  last unit (done/total, elapsed, ETA), and a tqdm bar if asked."""
  total: int
  unit: str
  log: Optional[Callable[[str], None]]
  bar: object
  t0: float
  last: float
  done: int = 0

  @classmethod
  def start(cls, total, unit, cache) -> "_Progress":
    """Progress of `total` units, logging to cache['log'], a bar if cache['progress']."""
    bar = None
    if cache.get("progress") and total:
      import tqdm  # pylint: disable=g-import-not-at-top  # only with progress=True
      bar = tqdm.tqdm(total=total, desc=f"NTK {unit}", unit=unit[:-1], leave=False)
    now = time.time()
    return cls(total=total, unit=unit, log=cache.get("log"), bar=bar, t0=now, last=now)

  def step(self, k: int = 1) -> None:
    """k more units done."""
    self.done += k
    if self.bar is not None:
      self.bar.update(k)
    now = time.time()
    if self.log and (self.done >= self.total or now - self.last >= PROGRESS_SECONDS):
      self.last = now
      spent = now - self.t0
      eta = spent / self.done * (self.total - self.done) if self.done else float("nan")
      self.log(f"NTK {self.unit} {self.done}/{self.total}: {spent:.1f} s elapsed, "
               f"ETA {eta:.1f} s")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


@dataclasses.dataclass(frozen=True, eq=False)
class _JacobianCalls:
  """What the compiled Jacobian calls of one kernel share: g and its parameter leaves (`live`:
  those its output depends on), one sample, the mesh, the budgets, the profile and the cache."""
  g: Callable
  params: object
  leaves: list
  treedef: object
  live: list
  x_one: object
  key: tuple  # of g, the parameter and sample shapes: compiled calls are cached under it
  mesh: Mesh
  rep: NamedSharding  # replicated over the mesh
  rows: NamedSharding  # samples split over the mesh
  prof: dict
  cache: dict
  contract: str = "host"  # where J J^T is computed: 'host' or 'device'
  limit: int = 0  # host bytes
  dev_limit: int = 0  # bytes of one call on one device
  b0: int = 1  # samples per device per call, at most

  @classmethod
  def create(cls, g, params, x1, mesh, prof, cache, contract="host") -> "_JacobianCalls":
    """The calls of g at params on samples like x1's over `mesh` (budgets: with_budget), their
    Jacobian panels contracted on the host or the devices (`contract`)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_one = _slice(x1, 0, 1)
    key = (id(g), treedef, _avals(leaves), _avals(x_one))
    # which leaves reach the output: the function's, not the values'
    if ("live",) + key not in cache:
      jaxpr = jax.make_jaxpr(lambda ls: g(treedef.unflatten(ls), x_one))(leaves).jaxpr
      cache[("live",) + key] = _live_inputs(jaxpr)
    return cls(g=g, params=params, leaves=leaves, treedef=treedef, live=cache[("live",) + key],
               x_one=x_one, key=key, mesh=mesh, rep=NamedSharding(mesh, P()),
               rows=NamedSharding(mesh, P(AXIS)), prof=prof, cache=cache, contract=contract)

  def with_budget(self, memory_limit, chunk, top, jac_batch) -> "_JacobianCalls":
    """These calls with the host budget, each device's, and the samples per device per call
    (jac_batch or JAC_BATCH, at most `chunk` and the `top` samples spread over the devices)."""
    b0 = JAC_BATCH if jac_batch is None else jac_batch
    b0 = max(1, min(b0 if chunk is None else min(b0, chunk), -(-top // self.n_dev)))
    limit = kernel_memory.default_memory_limit() if memory_limit is None else memory_limit
    dev_limit = kernel_memory.device_memory_limit(self.local[0], limit, len(self.local))
    return dataclasses.replace(self, limit=limit, dev_limit=dev_limit, b0=b0)

  @property
  def active(self) -> list:
    return [l for l, u in zip(self.leaves, self.live) if u]

  @property
  def inactive(self) -> list:
    return [l for l, u in zip(self.leaves, self.live) if not u]

  @property
  def p_act(self) -> int:
    return int(sum(np.size(l) for l in self.active))

  @property
  def itemsize(self) -> int:
    return np.dtype(jnp.result_type(*self.active)).itemsize

  @property
  def devs(self) -> np.ndarray:
    return self.mesh.devices.reshape(-1)

  @property
  def n_dev(self) -> int:
    return len(self.devs)

  @property
  def local(self) -> list:
    return [d for d in self.devs if d.process_index == jax.process_index()]

  @property
  def share(self) -> tuple:
    """(index, count) of this process among the mesh's: its share of the rows to contract."""
    procs = sorted({d.process_index for d in self.devs})
    return (procs.index(jax.process_index()), len(procs))

  def compiled(self, size, b):
    """The compiled Jacobian call of b samples per device, outputs given by an index argument of
    `size` entries, and its CallMemory on one device."""
    ck = ("jac",) + self.key + (size, b, tuple(d.id for d in self.devs))
    if ck not in self.cache:
      jac = self._compile(size, b)
      self.cache[ck] = (jac, self._call_memory(jac, size, b))
    return self.cache[ck]

  def _compile(self, size, b):
    """_device_jacobian over the mesh, lowered for b samples per device and compiled."""
    t = time.time()
    body = functools.partial(_device_jacobian, self.g, self.treedef, self.live)
    fn = jax.jit(jax.shard_map(body, mesh=self.mesh,
                               in_specs=(P(), P(), P(AXIS), P()), out_specs=P(AXIS),
                               check_vma=False),
                 in_shardings=(self.rep, self.rep, self.rows, self.rep), out_shardings=self.rows)
    xs = jax.tree_util.tree_map(
        lambda t: jax.ShapeDtypeStruct((b * self.n_dev,) + t.shape[1:], t.dtype,
                                       sharding=self.rows), self.x_one)
    jac = fn.lower(self._specs(self.active), self._specs(self.inactive), xs,
                   jax.ShapeDtypeStruct((size,), jnp.int32, sharding=self.rep)).compile()
    self.prof["compile_s"] = self.prof.get("compile_s", 0.0) + time.time() - t
    return jac

  def _specs(self, leaves) -> list:
    """Replicated shape specs of some parameter leaves."""
    return [jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l), sharding=self.rep)
            for l in leaves]

  def _call_memory(self, jac, size, b) -> kernel_memory.CallMemory:
    """CallMemory of a compiled call: XLA's memory_analysis, else call_memory_formula."""
    try:
      m = jac.memory_analysis()
      return kernel_memory.CallMemory(
          arguments=int(m.argument_size_in_bytes), temp=int(m.temp_size_in_bytes),
          output=int(m.output_size_in_bytes), source="xla")
    except Exception:  # pylint: disable=broad-except  # not every backend reports it
      arg_bytes = sum(np.size(l) * jnp.result_type(l).itemsize for l in self.leaves) + b * sum(
          np.size(t) * t.dtype.itemsize for t in jax.tree_util.tree_leaves(self.x_one))
      return kernel_memory.call_memory_formula(
          lambda p, x: self.g(p, x)[:, :size], self.params, self.x_one, b, size, self.p_act,
          self.itemsize, arg_bytes)

  def host_scratch(self, size, b, mem) -> int:
    """What the calls of `size` outputs and b samples per device add on this host."""
    return kernel_memory.host_scratch(mem, b, self.n_dev, len(self.local),
                                      self.local[0].platform == "cpu", size, self.p_act,
                                      self.itemsize)

  def layout(self, b, mem) -> kernel_memory.DeviceLayout:
    """The DeviceLayout of calls of b samples per device of CallMemory `mem`."""
    return kernel_memory.DeviceLayout(devices=self.n_dev, local=len(self.local), batch=b,
                                      call=mem.total, cpu=self.local[0].platform == "cpu")

  def plan(self, size):
    """(compiled call, CallMemory, samples per device) of `size` outputs: b0 samples per
    device, halved while one device's call exceeds its budget."""
    b = self.b0
    while True:
      jac, mem = self.compiled(size, b)
      if mem.total <= self.dev_limit or b == 1:
        break
      b = max(1, b // 2)
    if self.local[0].platform != "cpu":
      kernel_memory.check_call(mem, self.dev_limit, size, self.p_act)
    return jac, mem, b


def _apply(g, treedef, live, act, inact, x):
  """g with its parameter leaves given as the `live` ones (act) and the others (inact)."""
  a, i = iter(act), iter(inact)
  return g(treedef.unflatten([next(a) if u else next(i) for u in live]), x)


def _device_jacobian(g, treedef, live, act, inact, x, idx):
  """One device's Jacobian call: (b, |idx|, P_active) rows of its b samples, outputs idx."""
  return _flat_jac(lambda q, y: _apply(g, treedef, live, q, inact, y)[:, idx], act, x)


def _fewest_output_groups(calls, n1, n2, o, trace, same) -> int:
  """The fewest output groups whose single panel (each Jacobian computed once) fits, else 1; a
  group size whose panel alone is over the budget is ruled out before compiling it."""
  full = n1 if same else max(n1, n2)
  if calls.contract == "device":
    return _fewest_output_groups_device(calls, n1, n2, o, trace, same, full)
  for k in range(1, o + 1):
    size = -(-o // k)
    if kernel_memory.estimate_bytes(n1, n2, size, calls.p_act, full, trace, calls.itemsize,
                                    same) > calls.limit:
      continue
    _, mem, b = calls.plan(size)
    if kernel_memory.estimate_bytes(n1, n2, size, calls.p_act, full, trace, calls.itemsize, same,
                                    calls.host_scratch(size, b, mem)) <= calls.limit:
      return k
  return 1


def _fewest_output_groups_device(calls, n1, n2, o, trace, same, full) -> int:
  """_fewest_output_groups of the device contraction (device_estimate within both budgets)."""
  for k in range(1, o + 1):
    size = -(-o // k)
    _, mem, b = calls.plan(size)
    est = kernel_memory.device_estimate(n1, n2, size, calls.p_act, full, trace,
                                        calls.layout(b, mem), calls.itemsize, same)
    if est.host <= calls.limit and est.device <= calls.dev_limit:
      return k
  return 1


def _plan_group(calls, size, n1, n2, chunk, trace, same):
  """(compiled call, samples per device, panel chunk) of a group of `size` outputs within the
  budgets (KernelMemoryError if none fits); profiles the MemoryPlan and logs it when it changes."""
  if calls.contract == "device":
    return _plan_group_device(calls, size, n1, n2, chunk, trace, same)
  p_act, itemsize, limit = calls.p_act, calls.itemsize, calls.limit
  if kernel_memory.estimate_bytes(n1, n2, size, p_act, 1, trace, itemsize, same) > limit:
    kernel_memory.check_memory(n1, n2, size, p_act, chunk, trace, limit, itemsize, same)  # raises
  jac, mem, b = calls.plan(size)
  scratch = calls.host_scratch(size, b, mem)
  need = kernel_memory.check_memory(n1, n2, size, p_act, chunk, trace, limit, itemsize, same,
                                    scratch)
  c = chunk or kernel_memory.choose_chunk(n1, n2, size, p_act, trace, limit, itemsize, same,
                                          scratch)
  plan = kernel_memory.MemoryPlan(
      devices=calls.n_dev, local_devices=len(calls.local), batch=b, call=mem,
      device_limit=calls.dev_limit, chunk=c, host_scratch=scratch, host_total=need,
      host_limit=limit, outputs=size, params=p_act)
  calls.prof.update(chunk=c, estimate_bytes=need, scratch_bytes=scratch, jac_batch=b,
                    device_bytes=mem.total, device_activation_bytes=mem.temp,
                    device_bytes_source=mem.source, memory_plan=plan.describe())
  _log_plan(calls, plan)
  return jac, b, c


def _log_plan(calls, plan) -> None:
  """Logs a MemoryPlan when it differs from the last one logged."""
  if calls.cache.get("log") and calls.cache.get("last_plan") != plan:
    calls.cache["log"](plan.describe())
  calls.cache["last_plan"] = plan


def _plan_group_device(calls, size, n1, n2, chunk, trace, same):
  """_plan_group of the device contraction: the panels and their contraction live on the
  devices, so the chunk is the largest whose device_estimate fits both budgets."""
  jac, mem, b = calls.plan(size)
  layout = calls.layout(b, mem)
  est = kernel_memory.check_memory_device(n1, n2, size, calls.p_act, chunk, trace, layout,
                                          calls.limit, calls.dev_limit, calls.itemsize, same)
  c = est.chunk
  kernel = n1 * n2 * (1 if trace else size * size) * 8
  plan = kernel_memory.MemoryPlan(
      devices=calls.n_dev, local_devices=len(calls.local), batch=b, call=mem,
      device_limit=calls.dev_limit, chunk=c, host_scratch=est.host - kernel,
      host_total=est.host, host_limit=calls.limit, outputs=size, params=calls.p_act,
      contract="device", device_total=est.device)
  calls.prof.update(chunk=c, estimate_bytes=est.host, scratch_bytes=plan.host_scratch,
                    jac_batch=b, device_bytes=mem.total, device_activation_bytes=mem.temp,
                    device_bytes_source=mem.source, device_total_bytes=est.device,
                    device_panel_bytes=est.panels, device_contract_bytes=est.contract,
                    memory_plan=plan.describe())
  _log_plan(calls, plan)
  return jac, b, c


def _group_kernel(calls, idx, plan, x1, x2, kshape, trace, same, prog) -> np.ndarray:
  """The float64 kernel of the outputs `idx` (traced: summed over them) with the group's `plan`
  (compiled call, samples per device, chunk), summed over the processes and, if joint, made
  symmetric; `prog` counts its blocks."""
  jac, b, c = plan
  args = (_put(calls.active, calls.rep), _put(calls.inactive, calls.rep),
          _put(np.asarray(idx, np.int32), calls.rep))
  dtype = np.dtype(jnp.result_type(*calls.active))
  if calls.contract == "device":
    width, p_pad = kernel_memory.device_slices(calls.p_act)
    panels = _DevicePanels(jac=jac, args=args, calls=calls, step=b * calls.n_dev,
                           outputs=len(idx), p_pad=p_pad, width=width, dtype=dtype, trace=trace)
  else:
    panels = _Panels(jac=jac, args=args, rows=calls.rows, step=b * calls.n_dev,
                     outputs=len(idx), p_act=calls.p_act, dtype=dtype, trace=trace,
                     share=calls.share, prof=calls.prof)
  part = np.zeros(kshape, np.float64)
  diag = _fill(part, panels, x1, x2, c, same, prog)
  if panels.share[1] > 1:
    part = _sum_over_processes(part, calls.prof)
  _symmetrise(part, diag, trace)
  return part


def _symmetrise(k, diag, trace):
  """Averages each diagonal block of `k` with its transpose: float32 products need not give
  J J^T exactly symmetric."""
  for a0, a1 in diag:
    blk = k[a0:a1, a0:a1]
    k[a0:a1, a0:a1] = (blk + _swap(blk, trace)) / 2


def _swap(k, trace):
  """K(x2, x1) of a block K(x1, x2): the transpose over samples (and outputs)."""
  return k.T if trace else k.transpose(1, 0, 3, 2)


@dataclasses.dataclass(frozen=True, eq=False)
class _Panels:
  """The Jacobian panels of one output group: the compiled call and its device arguments, the
  panel shape, and this process's `share` (index, count) of the rows to contract."""
  jac: Callable  # (active leaves, inactive leaves, samples, output indices) -> Jacobian rows
  args: tuple  # the call's device arguments: active leaves, inactive leaves, output indices
  rows: NamedSharding  # of the samples
  step: int  # samples per call, over every device
  outputs: int
  p_act: int
  dtype: np.dtype
  trace: bool
  share: tuple
  prof: dict

  def call(self, x):
    """The Jacobian rows of `step` host samples, a global array."""
    act, inact, idx = self.args
    return self.jac(act, inact, _put(x, self.rows), idx)

  def panel(self, x, a0, a1) -> np.ndarray:
    """(a1 - a0, O, P_active) host Jacobian of samples a0:a1 of x, `step` samples per call."""
    t0 = time.time()
    res = np.empty((a1 - a0, self.outputs, self.p_act), self.dtype)
    for s in range(a0, a1, self.step):
      e = min(a1, s + self.step)
      res[s - a0:e - a0] = _fetch(self.call(_pad(_slice(x, s, e), self.step)), self.prof,
                                  "rows")[:e - s]
    self.prof["jacobian_s"] += time.time() - t0
    self.prof["jacobian_samples"] += a1 - a0
    return res

  def contract(self, ja, jb, a0, a1):
    """(rows of this share, block rows a0:a1 relative) of ja jb^T; (r0, r1) absolute."""
    t0 = time.time()
    part = np.array_split(np.arange(a0, a1), self.share[1])[self.share[0]]
    r0, r1 = (int(part[0]), int(part[-1]) + 1) if len(part) else (a0, a0)
    step = kernel_memory.contract_step(a1 - a0, len(jb), self.outputs, self.trace)
    blk = _contract(ja[r0 - a0:r1 - a0], jb, self.trace, step)
    self.prof["contract_s"] += time.time() - t0
    return blk, r0, r1


@dataclasses.dataclass(frozen=True)
class _Held:
  """A Jacobian panel held on the devices: (calls, step, O, P_pad) rows of `n` samples (the
  step axis split over the mesh; padded rows after the n-th)."""
  rows: jax.Array
  n: int


@dataclasses.dataclass(frozen=True, eq=False)
class _DevicePanels:
  """The Jacobian panels of one output group kept on the devices and their J J^T blocks computed
  there (_device_contract); only the blocks come to the host. Every process gets every block,
  so each has the whole kernel (`share` (0, 1): nothing to sum over processes)."""
  jac: Callable  # (active leaves, inactive leaves, samples, output indices) -> Jacobian rows
  args: tuple  # the call's device arguments: active leaves, inactive leaves, output indices
  calls: _JacobianCalls  # the mesh, profile and compiled-function cache
  step: int  # samples per call, over every device
  outputs: int
  p_pad: int  # parameters per row, padded with zeros to whole slices of `width`
  width: int  # parameters per slice of the contraction
  dtype: np.dtype
  trace: bool
  share: tuple = (0, 1)

  @property
  def spec(self) -> NamedSharding:
    """Panels (calls, step, O, P_pad): the step axis split over the mesh."""
    return NamedSharding(self.calls.mesh, P(None, AXIS))

  def _cached(self, key, build):
    """calls.cache[key], built once by build()."""
    key = (key, self.step, self.outputs, self.p_pad, self.width, str(self.dtype), self.trace,
           tuple(d.id for d in self.calls.devs))
    if key not in self.calls.cache:
      t = time.time()
      self.calls.cache[key] = build()
      self.calls.prof["compile_s"] = self.calls.prof.get("compile_s", 0.0) + time.time() - t
    return self.calls.cache[key]

  def panel(self, x, a0, a1) -> _Held:
    """The panel of samples a0:a1 of x, `step` samples per Jacobian call, on the devices."""
    t0 = time.time()
    act, inact, idx = self.args
    n_calls = -(-(a1 - a0) // self.step)
    buf = self._cached(("zeros", n_calls), functools.partial(self._zeros, n_calls))()
    write = self._cached(("write", n_calls), functools.partial(self._write, n_calls))
    for c, s in enumerate(range(a0, a1, self.step)):
      rows = self.jac(act, inact, _put(_pad(_slice(x, s, min(a1, s + self.step)), self.step),
                                       self.calls.rows), idx)
      buf = write(buf, rows, _put(np.int32(c), self.calls.rep))
      del rows
      buf.block_until_ready()  # one call in flight: its rows and activations, as estimated
    self.calls.prof["jacobian_s"] += time.time() - t0
    self.calls.prof["jacobian_samples"] += a1 - a0
    return _Held(rows=buf, n=a1 - a0)

  def _zeros(self, n_calls):
    """A compiled () -> zero panel of n_calls calls."""
    shape = (n_calls, self.step, self.outputs, self.p_pad)
    return jax.jit(functools.partial(jnp.zeros, shape, self.dtype),
                   out_shardings=self.spec).lower().compile()

  def _write(self, n_calls):
    """A compiled (panel, a call's rows, call index) -> the panel with the rows written in (the
    panel donated: updated in place)."""
    body = jax.shard_map(_write_rows, mesh=self.calls.mesh, in_specs=(P(None, AXIS), P(AXIS), P()),
                         out_specs=P(None, AXIS), check_vma=False)
    fn = jax.jit(body, in_shardings=(self.spec, self.calls.rows, self.calls.rep),
                 out_shardings=self.spec, donate_argnums=0)
    p_act = self.calls.p_act
    return fn.lower(
        jax.ShapeDtypeStruct((n_calls, self.step, self.outputs, self.p_pad), self.dtype,
                             sharding=self.spec),
        jax.ShapeDtypeStruct((self.step, self.outputs, p_act), self.dtype,
                             sharding=self.calls.rows),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=self.calls.rep)).compile()

  def contractor(self, ca, cb):
    """The compiled device contraction of panels of ca and cb calls (_device_contract)."""
    return self._cached(("contract", ca, cb), functools.partial(self._compile_contract, ca, cb))

  def _compile_contract(self, ca, cb):
    """_device_contract over the mesh, lowered for panels of ca and cb calls and compiled; its
    memory_analysis, where the backend reports one, goes to the profile."""
    n_dev = self.calls.n_dev
    body = functools.partial(_device_contract, self.trace, self.width, n_dev)
    fn = jax.jit(jax.shard_map(body, mesh=self.calls.mesh, in_specs=(P(None, AXIS),) * 2,
                               out_specs=P(None, AXIS), check_vma=False),
                 in_shardings=(self.spec, self.spec), out_shardings=self.spec)
    spec = lambda c: jax.ShapeDtypeStruct((c, self.step, self.outputs, self.p_pad), self.dtype,
                                          sharding=self.spec)
    compiled = fn.lower(spec(ca), spec(cb)).compile()
    try:  # beside the panels (its arguments): its temporaries and its block
      m = compiled.memory_analysis()
      self.calls.prof["device_contract_bytes_xla"] = max(
          self.calls.prof.get("device_contract_bytes_xla", 0),
          int(m.temp_size_in_bytes + m.output_size_in_bytes))
    except Exception:  # pylint: disable=broad-except  # not every backend reports it
      pass
    return compiled

  def contract(self, ja: _Held, jb: _Held, a0, a1):
    """(the whole block ja jb^T as float64 on the host, a0, a1): computed on the devices, the
    padded rows and columns dropped."""
    t0 = time.time()
    ca, cb = ja.rows.shape[0], jb.rows.shape[0]
    blk = _fetch(self.contractor(ca, cb)(ja.rows, jb.rows), self.calls.prof, "blocks")
    n_dev, b = self.calls.n_dev, self.step // self.calls.n_dev
    tail = () if self.trace else (self.outputs, self.outputs)
    blk = blk.reshape((ca * self.step, cb * n_dev * b) + tail)[:ja.n, :jb.n]
    self.calls.prof["contract_s"] += time.time() - t0
    return blk.astype(np.float64), a0, a1


def _write_rows(buf, rows, c):
  """One device's panel with its rows of call c written in (the padded parameters stay 0)."""
  return lax.dynamic_update_slice(buf, rows[None].astype(buf.dtype), (c, 0, 0, 0))


def _slice_products(a, b, trace, width, i):
  """Products of parameter slice i (of `width`) of two devices' panels, (ca, bl, O, P) and
  (cb, bl, O, P): traced (ca, bl, cb, bl) summed over the outputs, else (ca, bl, cb, bl, O, O);
  float32 inputs at HIGHEST precision, accumulated in the panels' dtype."""
  sa = lax.dynamic_slice_in_dim(a, i * width, width, axis=3)
  sb = lax.dynamic_slice_in_dim(b, i * width, width, axis=3)
  spec = "xyop,zwop->xyzw" if trace else "xyop,zwqp->xyzwoq"
  return jnp.einsum(spec, sa, sb, precision=lax.Precision.HIGHEST,
                    preferred_element_type=a.dtype)


def _kahan_step(a, b, trace, width, i, carry):
  """Adds slice i's products to a Kahan-compensated sum (sum, compensation)."""
  total, comp = carry
  y = _slice_products(a, b, trace, width, i) - comp
  t = total + y
  return t, (t - total) - y


def _block_products(a, b, trace, width):
  """a b^T of two devices' panels over every parameter slice, the slices' sums added with Kahan
  compensation (a float32 sum over millions of parameters keeps its digits)."""
  shape = a.shape[:2] + b.shape[:2] + (() if trace else (a.shape[2], b.shape[2]))
  zero = jnp.zeros(shape, a.dtype)
  total, comp = lax.fori_loop(0, a.shape[3] // width,
                              functools.partial(_kahan_step, a, b, trace, width), (zero, zero))
  return total - comp


def _ring_step(trace, width, n_dev, a, t, carry):
  """Ring step t: this device's rows a against the column rows it holds (those of device
  (i + t) mod n, written at that slot), then the column rows passed on to device i - 1."""
  b, out = carry
  slot = (lax.axis_index(AXIS) + t) % n_dev
  out = lax.dynamic_update_index_in_dim(out, _block_products(a, b, trace, width), slot, axis=3)
  b = lax.ppermute(b, AXIS, perm=[(j, (j - 1) % n_dev) for j in range(n_dev)])
  return b, out


def _device_contract(trace, width, n_dev, a, b):
  """One device's rows of the block A B^T: its panel rows a (ca, bl, O, P) against every
  device's column rows, which circulate round the ring (n - 1 ppermutes); (ca, bl, cb, n, bl)
  (untraced: + (O, O)), the n axis the column rows' device."""
  shape = a.shape[:2] + (b.shape[0], n_dev, b.shape[1]) + (
      () if trace else (a.shape[2], b.shape[2]))
  out = jnp.zeros(shape, a.dtype)
  b, out = lax.fori_loop(0, n_dev - 1, functools.partial(_ring_step, trace, width, n_dev, a),
                         (b, out))
  slot = (lax.axis_index(AXIS) + n_dev - 1) % n_dev
  return lax.dynamic_update_index_in_dim(out, _block_products(a, b, trace, width), slot, axis=3)


def _fill(out, panels, x1, x2, chunk, same, prog=None) -> list:
  """Adds the panels' contractions (traced: summed over outputs) into `out`: the panels are
  filled by `panels.panel` (step samples at a time, over every device); this process contracts
  its `share` (index, count) of each block's rows (the device contraction: every row). Returns
  the diagonal blocks of a joint kernel, which the caller symmetrises once the shares are summed;
  `prog` counts the blocks done."""
  prog = prog or _Progress.start(0, "panels", {})
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  rows = _chunks(n1, chunk)
  if same:
    for i, (a0, a1) in enumerate(rows):
      ja = panels.panel(x1, a0, a1)
      for b0, b1 in rows[i:]:
        jb = ja if b0 == a0 else panels.panel(x1, b0, b1)
        blk, r0, r1 = panels.contract(ja, jb, a0, a1)
        out[r0:r1, b0:b1] += blk
        if b0 != a0:
          out[b0:b1, r0:r1] += _swap(blk, panels.trace)
        del jb  # at most two panels alive, as estimated
        prog.step()
      del ja
    return rows
  cols = _chunks(n2, chunk)
  j2 = panels.panel(x2, 0, n2) if len(cols) == 1 else None  # one panel: computed once, kept
  for a0, a1 in rows:
    ja = panels.panel(x1, a0, a1)
    for b0, b1 in cols:
      jb = j2 if j2 is not None else panels.panel(x2, b0, b1)
      blk, r0, r1 = panels.contract(ja, jb, a0, a1)
      out[r0:r1, b0:b1] += blk
      del jb
      prog.step()
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


def _ntvp_kernel(g, params, x1, x2, trace, dtype, mesh=None, per_device=None, prof=None,
                 cache=None):
  """Columns of K(x1, x2) from NTK-vector products, K e_(j,q) = J1 J2^T e_(j,q), split over the
  devices of `mesh`: each call computes `per_device` (None: 1) columns on every device (one
  device of this process and one column per call: _ntvp_one_device)."""
  mesh = device_mesh() if mesh is None else mesh
  prof = {} if prof is None else prof
  cache = {} if cache is None else cache
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  y2 = jax.eval_shape(g, params, x2)
  o = y2.shape[1]
  n_dev = mesh.devices.size
  step = n_dev * (per_device or 1)
  if step == 1 and jax.process_count() == 1:
    t0 = time.time()
    full = _ntvp_one_device(g, params, x1, x2, o, dtype, prof, cache)
    prof.update(devices=1, ntvp_columns_per_call=1, jacobian_s=time.time() - t0)
    return np.einsum("abii->ab", full) / o if trace else full
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  key = ("ntvp", id(g), _avals(params), _avals(x1), _avals(x2), step,
         tuple(d.id for d in mesh.devices.reshape(-1)))
  if key not in cache:
    body = functools.partial(_ntvp_columns, g, o, y2.dtype)
    cache[key] = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)),
                                       out_specs=P(AXIS), check_vma=False),
                         in_shardings=(rep, rep, rep, rows), out_shardings=rows)
  columns = cache[key]
  args = (_put(params, rep), _put(x1, rep), _put(x2, rep))
  full = np.zeros((n1, n2, o, o), dtype)
  total = n2 * o
  prog = _Progress.start(total, "columns", cache)
  t0 = time.time()
  for k0 in range(0, total, step):
    ks = np.minimum(np.arange(k0, k0 + step), total - 1).astype(np.int32)  # padded: the last
    cols = _fetch(columns(*args, _put(ks, rows)), prof, "rows")
    for k, col in zip(range(k0, min(total, k0 + step)), cols):
      full[:, k // o, :, k % o] = np.asarray(col, dtype)
    prog.step(min(total, k0 + step) - k0)
  prog.close()
  prof.update(devices=n_dev, ntvp_columns_per_call=step, jacobian_s=time.time() - t0)
  return np.einsum("abii->ab", full) / o if trace else full


def _ntvp_one_device(g, params, x1, x2, o, dtype, prof, cache) -> np.ndarray:
  """(N1, N2, O, O) of NTK-vector products on the default device, one compiled call per column
  with J2's vjp closed over (its residuals constants of the call)."""
  n1 = len(jax.tree_util.tree_leaves(x1)[0])
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  _, vjp2 = jax.vjp(lambda p: g(p, x2), params)
  column = jax.jit(functools.partial(_ntvp_vjp_column, g, vjp2, params, x1))
  full = np.zeros((n1, n2, o, o), dtype)
  prog = _Progress.start(n2 * o, "columns", cache)
  for j in range(n2):
    for q in range(o):
      e = jnp.zeros((n2, o)).at[j, q].set(1.0)
      full[:, j, :, q] = np.asarray(_fetch(column(e), prof, "rows"), dtype)
      prog.step()
  prog.close()
  return full


def _ntvp_vjp_column(g, vjp2, params, x1, e):
  """K e = J1 (J2^T e) of a cotangent e of x2's outputs, J2^T given by its vjp."""
  (ct,) = vjp2(e)
  return jax.jvp(lambda p: g(p, x1), (params,), (ct,))[1]  # (N1, O)


def _ntvp_columns(g, o, dtype, params, x1, x2, ks):
  """One device's NTK-vector products: the columns K e_k (N1, O) of its indices ks, k = j O + q."""
  return jax.vmap(functools.partial(_ntvp_column, g, o, dtype, params, x1, x2))(ks)


def _ntvp_column(g, o, dtype, params, x1, x2, k):
  """K e_k = J1 J2^T e_k for sample j = k // O, output q = k % O of x2: a vjp and a jvp."""
  n2 = len(jax.tree_util.tree_leaves(x2)[0])
  e = jnp.zeros((n2, o), dtype).at[k // o, k % o].set(1.0)
  _, vjp2 = jax.vjp(lambda p: g(p, x2), params)
  (ct,) = vjp2(e)
  return jax.jvp(lambda p: g(p, x1), (params,), (ct,))[1]  # (N1, O)


def multiview_matrix(k) -> np.ndarray:
  """(N, N, V, V) -> the (N V, N V) kernel over (sample, view) pairs, sample-major."""
  k = np.asarray(k)
  n1, n2, v, w = k.shape
  return k.transpose(0, 2, 1, 3).reshape(n1 * v, n2 * w)
