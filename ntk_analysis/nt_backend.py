"""neural-tangents behind nt_compat, with our conventions (spec ntk_analysis.md 3.2 "Backends").

`empirical_ntk` here returns exactly what kernels.empirical_ntk(backend='jax') returns: traced =
mean over the last output axis, full = (N1, N2, O, O), float64 host array.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

IMPLEMENTATIONS = {0: "AUTO", 1: "JACOBIAN_CONTRACTION", 2: "NTK_VECTOR_PRODUCTS",
                   3: "STRUCTURED_DERIVATIVES"}


def nt():
  """The neural_tangents module with our shims (ImportError with the reason otherwise)."""
  from ntk_analysis import nt_compat  # pylint: disable=g-import-not-at-top
  return nt_compat.import_neural_tangents()


def empirical_ntk(g: Callable, params, x1, x2=None, *, trace: bool = True,
                  implementation: int = 1, dtype=np.float64) -> np.ndarray:
  """nt.empirical_ntk_fn(g, trace_axes=(-1,) or (), vmap_axes=0, implementation)(x1, x2, params)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation}; one of {IMPLEMENTATIONS}")
  fn = nt().empirical_ntk_fn(g, trace_axes=(-1,) if trace else (), vmap_axes=0,
                             implementation=implementation)
  return np.asarray(fn(x1, x2, params), dtype)
