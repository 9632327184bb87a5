"""Memory planning of the empirical NTK (kernels.py): the bytes a kernel's Jacobian panels,
float64 kernel and compiled Jacobian calls take on the host and on each device, and the largest
panel that fits a budget, so that a kernel too large is refused with what to shrink.

Two contractions: 'host' (the Jacobian panels on the host, estimate_bytes) and 'device' (the
panels stay on the devices, split over them by samples, and only kernel blocks reach the host:
device_estimate, with its per-device and host bytes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

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
# Parameters per slice of the device contraction, at most: one float32 product per slice, the
# slices' sums Kahan-compensated; 1024 kept the float32 device kernel as close to a float64 one
# as the host path's (tests/test_ntk_multidevice.py), 65536 was ten times further.
DEVICE_SLICE = 1 << 10
# What XLA's CPU runtime holds around a Jacobian call beyond its memory_analysis (thread scratch,
# the samples staged through the host), as a fraction of the call: the device contraction's
# estimate counts it on CPU devices (the activation case of benchmarks/ntk.py peaked up to ~7%
# above panels + call).
CPU_CALL_ALLOWANCE = 0.1


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


def _largest_fit(fits: Callable[[int], bool], top: int) -> Optional[int]:
  """`top` if it fits, else the largest chunk below it that does (below `top` the estimates grow
  with the chunk, so bisect the last fit); None if not even 1."""
  if fits(top):
    return top
  lo, hi = 0, top - 1
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return lo or None


def choose_chunk(n1: int, n2: int, outputs: int, n_params: int, trace: bool, limit: int,
                 itemsize: int = 4, same: bool = False, activations: int = 0) -> Optional[int]:
  """The largest chunk (<= max(n1, n2)) whose estimate_bytes fits `limit`; None if not even 1."""
  fits = lambda c: estimate_bytes(n1, n2, outputs, n_params, c, trace, itemsize, same,
                                  activations) <= limit
  return _largest_fit(fits, n1 if same else max(n1, n2))


def _unfit_words(auto: bool, chunk: int) -> tuple[str, str]:
  """(what was tried, what the user can change) for the error of a kernel that does not fit."""
  if auto:
    return "even with chunk 1 (one sample per Jacobian panel)", ""
  return (f"with chunk {chunk}",
          "lower `chunk` (--chunk), or leave it unset to take the largest that fits; ")


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
    what, todo = _unfit_words(auto, chunk)
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

  contract: str = "host"  # where J J^T is computed: 'host' or 'device' (device_estimate)
  device_total: int = 0  # device contraction: one device's panels, contraction and call

  def describe(self) -> str:
    c = self.call
    if self.contract == "device":
      return (f"NTK memory: {self.devices} device(s) x {self.batch} sample(s) per Jacobian call "
              f"of {self.outputs} outputs x {self.params:,} parameters, panels of {self.chunk} "
              f"samples and their J J^T on the devices: {_size(self.device_total)} per device "
              f"(Jacobian call {_size(c.total)} ({c.source}: activations {_size(c.temp)}); budget "
              f"{_size(self.device_limit)}); host: kernel + blocks {_size(self.host_total)} "
              f"(budget {_size(self.host_limit)})")
    return (f"NTK memory: {self.devices} device(s) x {self.batch} sample(s) per Jacobian call of "
            f"{self.outputs} outputs x {self.params:,} parameters: {_size(c.total)} per device "
            f"({c.source}: arguments {_size(c.arguments)}, activations {_size(c.temp)}, output "
            f"{_size(c.output)}; budget {_size(self.device_limit)}); host: panels of "
            f"{self.chunk} samples + kernel + call scratch {_size(self.host_scratch)} = "
            f"{_size(self.host_total)} (budget {_size(self.host_limit)})")


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
  """How the device contraction spreads a kernel: `devices` in the mesh (`local` of them this
  host's), `batch` samples per device per Jacobian call of `call` bytes on one device, and
  whether the devices are CPU devices (their memory is the host's)."""
  devices: int
  local: int
  batch: int
  call: int
  cpu: bool

  @property
  def step(self) -> int:
    """Samples per Jacobian call over every device."""
    return self.batch * self.devices

  def rows(self, n: int) -> int:
    """Rows one device holds of a panel of n samples (padded to whole calls)."""
    return -(-n // self.step) * self.batch


def device_slices(n_params: int) -> tuple:
  """(parameters per slice, P padded to whole slices) of the device contraction: equal slices of
  at most DEVICE_SLICE parameters, whose products are summed on the device, Kahan-compensated."""
  k = -(-max(1, n_params) // DEVICE_SLICE)
  step = -(-max(1, n_params) // k)
  return step, k * step


@dataclasses.dataclass(frozen=True)
class DeviceEstimate:
  """Bytes of the device contraction with panels of `chunk` samples: on one device its Jacobian
  panels, the contraction's buffers (the circulating column panel, slice copies, accumulators,
  its block) and one Jacobian call (CPU devices: with CPU_CALL_ALLOWANCE); on the host the
  float64 kernel, the gathered blocks and, for CPU devices, every local device's bytes."""
  chunk: int
  panels: int
  contract: int
  call: int
  host: int

  @property
  def device(self) -> int:
    return self.panels + self.contract + self.call


def device_estimate(n1: int, n2: int, outputs: int, n_params: int, chunk: int, trace: bool,
                    layout: DeviceLayout, itemsize: int = 4, same: bool = False) -> DeviceEstimate:
  """DeviceEstimate of panels of `chunk` samples (one panel if `same` and it covers all n1);
  the contraction accumulates in the Jacobians' dtype (`itemsize`)."""
  c1, c2 = min(chunk, n1), min(chunk, n2)
  ra, rb = layout.rows(c1), layout.rows(c2)
  step, p_pad = device_slices(n_params)
  row = outputs * p_pad * itemsize
  panels = (ra if (same and chunk >= n1) else ra + rb) * row
  per = 1 if trace else outputs * outputs
  blk = ra * rb * per * itemsize  # one column device's block on one device
  # the column panel circulating (held and received; one device: none), both slices and their
  # copies, the dot, Kahan's sum, compensation and temporaries, and the device's rows of the
  # whole block, twice (the loop's carry and its update)
  ring = 2 * rb * row if layout.devices > 1 else 0
  contract = (ring + 2 * (ra + rb) * outputs * step * itemsize + 6 * blk
              + 2 * layout.devices * blk)
  call = int(layout.call * (1 + CPU_CALL_ALLOWANCE)) if layout.cpu else layout.call
  gathered = ra * rb * layout.devices ** 2 * per * itemsize
  host = n1 * n2 * per * 8 + 2 * gathered + c1 * c2 * per * 8
  if layout.cpu:
    host += layout.local * (panels + contract + call)
  return DeviceEstimate(chunk=chunk, panels=panels, contract=contract, call=call, host=host)


def choose_chunk_device(n1: int, n2: int, outputs: int, n_params: int, trace: bool,
                        layout: DeviceLayout, host_limit: int, device_limit: int,
                        itemsize: int = 4, same: bool = False) -> Optional[int]:
  """The largest chunk (<= max(n1, n2)) whose device_estimate fits both budgets; None if not
  even 1."""
  fits = lambda c: _fits(device_estimate(n1, n2, outputs, n_params, c, trace, layout, itemsize,
                                         same), host_limit, device_limit)
  return _largest_fit(fits, n1 if same else max(n1, n2))


def _fits(est: DeviceEstimate, host_limit: int, device_limit: int) -> bool:
  return est.host <= host_limit and est.device <= device_limit


def check_memory_device(n1, n2, outputs, n_params, chunk, trace, layout: DeviceLayout,
                        host_limit: int, device_limit: int, itemsize=4,
                        same=False) -> DeviceEstimate:
  """The DeviceEstimate with `chunk` (None: the largest that fits); KernelMemoryError if over
  either budget."""
  auto = chunk is None
  if auto:
    chunk = choose_chunk_device(n1, n2, outputs, n_params, trace, layout, host_limit,
                                device_limit, itemsize, same)
    if chunk is not None:
      return device_estimate(n1, n2, outputs, n_params, chunk, trace, layout, itemsize, same)
    chunk = 1
  est = device_estimate(n1, n2, outputs, n_params, chunk, trace, layout, itemsize, same)
  if not _fits(est, host_limit, device_limit):
    what, todo = _unfit_words(auto, chunk)
    raise KernelMemoryError(
        f"an NTK of {n1}x{n2} samples, {outputs} outputs, {n_params:,} parameters contracted on "
        f"the devices {what} needs about {_size(est.device)} per device (budget "
        f"{_size(device_limit)}) and {_size(est.host)} on the host (limit {_size(host_limit)}): "
        f"{todo}use fewer samples (--n_per_task), fewer outputs (a sketch readout with a few "
        f"probes (--probes), or trace=True), more devices, or method='ntvp' (no Jacobian); "
        f"raise `memory_limit` (--memory_limit_gb) if you have the memory")
  return est


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
