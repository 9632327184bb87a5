"""XLA flags for the tests and the subprocesses they start.

The tests compile XLA's CPU code at LLVM optimisation level 0: the tiny test models then compile
about twice as fast (compilation, not execution, is most of a test's time) and CI stays within its
budget. A bit-identity test compares runs made under the same flags; every other test checks
against an independent expectation with a tolerance, so results do not depend on the level."""
from typing import Optional

OPTIMISATION = "--xla_backend_optimization_level=0"


def flags(devices: Optional[int] = None) -> str:
  """XLA_FLAGS for `devices` fake CPU devices (None: JAX's default, one)."""
  fake = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
  return " ".join(fake + [OPTIMISATION])
