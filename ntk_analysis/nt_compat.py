"""Makes neural-tangents 0.6.5 importable and correct on jax 0.10.1 (the `ntk` extra's pin).

neural-tangents' last release predates JAX 0.6; importing it fails on (1) jaxpr types removed
from `jax.core`, (2) `jax.util.safe_map/safe_zip` removed, (4) its TensorFlow bridge
(`neural_tangents.experimental`, TF is not a dependency of ours), and AUTO reads
`cost_analysis()` as a list. (3)/(5): STRUCTURED_DERIVATIVES reads JAX internals that moved.
`import_neural_tangents()` installs the shims (idempotent) and returns the module, or raises
ImportError saying why. It touches JAX internals: this is why the `ntk` extra pins jax
(setup.py); the core package accepts a range.
`empirical_ntk` is neural-tangents' empirical kernel with our conventions (kernels.ntk_fn's
backend='neural_tangents'): traced = mean over the last output axis, full = (N1, N2, O, O),
float64 host array.
"""
from __future__ import annotations

import builtins
import importlib.util
import sys
import types
from typing import Callable

import jax
import numpy as np

SUPPORTED_JAX = ("0.10.1",)
IMPLEMENTATIONS = {0: "AUTO", 1: "JACOBIAN_CONTRACTION", 2: "NTK_VECTOR_PRODUCTS",
                   3: "STRUCTURED_DERIVATIVES"}
_INSTALLED = False


def _safe_map(f, *args):
  args = list(map(list, args))
  n = len(args[0])
  for a in args[1:]:
    assert len(a) == n, f"length mismatch: {list(map(len, args))}"
  return list(map(f, *args))


def _safe_zip(*args):
  args = list(map(list, args))
  n = len(args[0])
  for a in args[1:]:
    assert len(a) == n, f"length mismatch: {list(map(len, args))}"
  return list(zip(*args))


def install() -> None:
  """Installs the shims neural-tangents 0.6.5 needs (idempotent)."""
  global _INSTALLED
  if _INSTALLED:
    return
  import jax.core as jcore  # pylint: disable=g-import-not-at-top
  import jax.extend.core as jex  # pylint: disable=g-import-not-at-top
  from jax._src import core as src_core  # pylint: disable=g-import-not-at-top
  # (1) jaxpr types: jax.core -> jax.extend.core / jax._src.core
  for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "ClosedJaxpr", "Primitive"):
    if not hasattr(jcore, name):
      setattr(jcore, name, getattr(jex, name, None) or getattr(src_core, name))
  if not hasattr(jcore, "DShapedArray"):  # dynamic shapes are gone; only used in `type(a) is`
    jcore.DShapedArray = getattr(src_core, "DShapedArray", type("DShapedArray", (), {}))
  for name in ("ShapedArray", "Value"):
    if not hasattr(jcore, name):
      setattr(jcore, name, getattr(src_core, name, object))
  # (2) jax.util.safe_map / safe_zip
  try:
    import jax.util as jutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    jutil = types.ModuleType("jax.util")
    sys.modules["jax.util"] = jutil
    jax.util = jutil
  if not hasattr(jutil, "safe_map"):
    jutil.safe_map = _safe_map
    jutil.safe_zip = _safe_zip
  # (3) attributes STRUCTURED_DERIVATIVES reads off jax.interpreters.ad
  from jax.interpreters import ad  # pylint: disable=g-import-not-at-top
  from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import ad as src_ad  # pylint: disable=g-import-not-at-top
  if not hasattr(ad, "source_info_util"):
    ad.source_info_util = source_info_util
  for name in ("zeros_like_p", "add_jaxvals_p", "Zero", "UndefinedPrimal", "primitive_transposes",
               "primitive_jvps", "is_undefined_primal", "instantiate_zeros"):
    if not hasattr(ad, name) and hasattr(src_ad, name):
      setattr(ad, name, getattr(src_ad, name))
  if not hasattr(ad, "add_jaxvals_p"):
    from jax._src import ad_util  # pylint: disable=g-import-not-at-top
    ad.add_jaxvals_p = ad_util.add_jaxvals_p
  if not hasattr(ad, "zeros_like_p"):
    ad.zeros_like_p = object()  # used only as a dictionary key by neural-tangents
  # (4) the TensorFlow bridge: an empty module stands in for neural_tangents.experimental
  if "neural_tangents.experimental" not in sys.modules:
    stub = types.ModuleType("neural_tangents.experimental")
    stub.__path__ = []
    sys.modules["neural_tangents.experimental"] = stub
  _INSTALLED = True


def _patch_cost_analysis(nt) -> None:
  """AUTO indexes `compiled.cost_analysis()[0]`; new JAX returns a dict."""
  from neural_tangents._src import empirical  # pylint: disable=g-import-not-at-top
  orig = getattr(empirical, "_get_flops", None)
  if orig is None or getattr(orig, "_ntkcl_patched", False):
    return

  def _get_flops(f, optimize, *a, **k):
    try:
      return orig(f, optimize, *a, **k)
    except (KeyError, TypeError):
      compiled = jax.jit(f).lower(*a, **k).compile()
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      return float(ca.get("flops", 0.0))
  _get_flops._ntkcl_patched = True  # pylint: disable=protected-access
  empirical._get_flops = _get_flops  # pylint: disable=protected-access
  del nt


class _PartialFlag:
  """jax <= 0.9 `linearize` returned PartialVals; 0.10 returns booleans ("tangent is zero")."""

  def __init__(self, known: bool):
    self._known = bool(known)

  def is_known(self) -> bool:
    return self._known


def _patch_structured_derivatives() -> None:
  """(5) STRUCTURED_DERIVATIVES on jax 0.10.1: `Primitive.map_primitive` is gone (default False)
  and the internal `ad.linearize` returns booleans; neural-tangents also needs the jaxpr of the
  classic (non-direct) linearize, so that one is used while it runs."""
  from jax._src import config as jconfig  # pylint: disable=g-import-not-at-top
  from jax._src import core as src_core  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import ad as src_ad  # pylint: disable=g-import-not-at-top
  from neural_tangents._src import empirical  # pylint: disable=g-import-not-at-top
  if not hasattr(src_core.Primitive, "map_primitive"):
    src_core.Primitive.map_primitive = False
  if getattr(empirical.ad, "_ntkcl_proxy", False):
    return
  real_ad = empirical.ad

  def linearize(fn, *primals, has_aux=False):
    with jconfig.use_direct_linearize(False):
      outs = src_ad.linearize(fn, *primals, has_aux=has_aux)
    flags = [z if hasattr(z, "is_known") else _PartialFlag(z) for z in outs[1]]
    return (outs[0], flags) + tuple(outs[2:])

  proxy = types.ModuleType("jax.interpreters.ad (ntkcl proxy)")
  proxy.__dict__.update({k: getattr(src_ad, k) for k in dir(src_ad) if not k.startswith("__")})
  proxy.__dict__.update({k: getattr(real_ad, k) for k in dir(real_ad) if not k.startswith("__")})
  proxy.config = jax.config  # `ad.config.jax_enable_checks`

  def get_primitive_transpose(prim):
    """Legacy (cts, *invals) -> cts_out transpose rules; jax 0.10 moved some primitives (slice,
    mul, dot_general, conv, ...) to accumulator-style `fancy_transposes` only."""
    if prim in src_ad.primitive_transposes:
      return src_ad.primitive_transposes[prim]
    rule = getattr(src_ad, "fancy_transposes", {}).get(prim)
    if rule is None:
      return src_ad.get_primitive_transpose(prim)  # raises the usual NotImplementedError

    def legacy(cts_in, *invals, **params):
      accums = [src_ad.ValAccum(v.aval) if src_ad.is_undefined_primal(v) else v for v in invals]
      rule(cts_in, *accums, **params)
      return [a.freeze() if isinstance(a, src_ad.ValAccum) else None for a in accums]
    return legacy
  proxy.get_primitive_transpose = get_primitive_transpose
  proxy.linearize = linearize
  proxy._ntkcl_proxy = True  # pylint: disable=protected-access
  empirical.ad = proxy


# How to get the optional neural-tangents backend (setup.py's `ntk` extra + install.sh).
INSTALL_HINT = ("install the `ntk` extra: `bash install.sh ntk` from a checkout, or "
                "`pip install 'ntkcl-jax[ntk]'` then `pip install --no-deps neural-tangents==0.6.5`"
                " (its TensorFlow requirement is not needed); or use backend='jax'")


def import_neural_tangents():
  """neural_tangents with our shims, or ImportError saying why and how to install the `ntk` extra
  (the pure-JAX backend needs neither)."""
  if importlib.util.find_spec("neural_tangents") is None:
    raise ImportError(f"backend='neural_tangents' needs neural-tangents 0.6.5, which is not "
                      f"installed: {INSTALL_HINT}")
  if jax.__version__ not in SUPPORTED_JAX:
    raise ImportError(f"ntk_analysis.nt_compat supports jax {SUPPORTED_JAX}, found "
                      f"{jax.__version__} (the shims patch that release's internals): "
                      f"{INSTALL_HINT}")
  install()
  try:
    import neural_tangents as nt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"neural-tangents could not be imported even with the compatibility shims "
                      f"({e}): {INSTALL_HINT}") from e
  _patch_cost_analysis(nt)
  _patch_structured_derivatives()
  return nt


def empirical_ntk(g: Callable, params, x1, x2=None, *, trace: bool = True,
                  implementation: int = 1, dtype=np.float64) -> np.ndarray:
  """nt.empirical_ntk_fn(g, trace_axes=(-1,) or (), vmap_axes=0, implementation)(x1, x2, params)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation}; one of {IMPLEMENTATIONS}")
  fn = import_neural_tangents().empirical_ntk_fn(g, trace_axes=(-1,) if trace else (),
                                                 vmap_axes=0, implementation=implementation)
  return np.asarray(fn(x1, x2, params), dtype)


del builtins
