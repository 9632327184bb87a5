"""Memory planning of the empirical NTK (kernels.py): the bytes a kernel's Jacobian panels,
float64 kernel and compiled Jacobian calls take on the host and on each device, and the largest
panel that fits a budget, so that a kernel too large is refused with what to shrink.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from jax.extend import core as jax_core
import numpy as np

MEMORY_FRACTION = 0.5  # of the available memory a kernel may use by default (the rest: others)
# Default budget cap: the README analysis (80 samples, 8 outputs, 754K parameters) then splits
# the fused view's outputs in two and peaks under 4 GB RSS in all, at about the same speed.
DEFAULT_MEMORY_CAP = 3 << 29  # 1.5 GiB
FALLBACK_MEMORY = 4 << 30  # bytes assumed available where the OS does not say
CONTRACT_BYTES = 256 << 20  # float64 scratch of the blockwise contraction
DEVICE_MEMORY_FRACTION = 0.8  # of an accelerator's free memory one Jacobian call may use


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
  kernels of several outputs: kernels._contract), and `activations`: what the Jacobian calls
  add on this host (MemoryPlan: devices whose memory is the host's (CPU) count their arguments,
  activations and output, and every call's gathered output), which is counted, not modelled."""
  c1, c2 = min(chunk, n1), min(chunk, n2)
  rows = c1 if (same and chunk >= n1) else c1 + c2
  jac = rows * outputs * n_params * itemsize
  kern = n1 * n2 * (1 if trace else outputs * outputs) * 8
  copies = 0
  if trace and outputs > 1:  # ja[:, i] is strided: each slice of P is copied, both panels
    copies = (c1 + c2) * min(n_params, contract_step(c1, c2, outputs, trace)) * itemsize
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


def contract_step(na, nb, o, trace):
  """Parameters per slice of the blockwise contraction (kernels._contract) of na and nb rows: its
  float32 slices within CONTRACT_BYTES."""
  rows = (na + nb) * (1 if trace else o)
  step = max(1 << 12, CONTRACT_BYTES // (4 * rows))
  return min(step, 1 << 18)  # float32 sums of at most 2^18 terms, then float64


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


def host_scratch(call: CallMemory, batch: int, devices: int, local_devices: int, cpu: bool,
                 outputs: int, p_active: int, itemsize: int) -> int:
  """What the calls add on this host: CPU devices' own memory, and each call's gathered
  output (batch x devices rows of outputs x p_active values)."""
  on_host = local_devices * call.total if cpu else 0
  return on_host + batch * devices * outputs * p_active * itemsize


def check_call(call: CallMemory, device_limit: int, outputs: int, p_active: int) -> None:
  """KernelMemoryError if `call`, of one sample per device, is over the per-device budget."""
  if call.total > device_limit:
    raise KernelMemoryError(
        f"one Jacobian call of 1 sample, {outputs} outputs and {p_active:,} parameters needs "
        f"{_size(call.total)} per device ({call.source}; activations {_size(call.temp)}), over "
        f"the device budget {_size(device_limit)}: use fewer outputs (a sketch readout with fewer "
        f"probes (--probes), or output_groups) or a smaller model input")


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
