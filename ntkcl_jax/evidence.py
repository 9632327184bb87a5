"""Paired per-seed comparisons with bootstrap intervals, and the verdicts the evidence pages print.

Every comparison on docs/results.md and docs/ntk.md is a difference measured within each seed (same
class order, same image subsample, same initialisation key), summarised by its mean over seeds
and a percentile-bootstrap 95% interval over seeds. A verdict is read off the interval alone:

    holds         the interval lies entirely on the side the prediction names
    fails         it lies entirely on the other side (or, for a 'no effect' prediction, outside
                  the stated margin)
    inconclusive  otherwise; the page then says "within noise" when the interval contains 0

    d = paired(ntkcl_by_seed, simplecil_by_seed)      # {seed: value} each
    d.text()        -> '+1.23 [+0.41, +2.05] (n=5)'
    verdict(d, ">0") -> 'holds' | 'fails' | 'inconclusive'
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

N_BOOT = 10_000
LEVEL = 0.95
MIN_SEEDS = 5  # below this the pages still print the interval but mark it as too few seeds


@dataclasses.dataclass(frozen=True)
class Interval:
  """An estimate with its bootstrap interval over `n` units (seeds, or seed clusters)."""
  estimate: float
  lo: float
  hi: float
  n: int

  def text(self, digits: int = 2, signed: bool = True) -> str:
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(self.estimate)} [{f.format(self.lo)}, {f.format(self.hi)}] (n={self.n})"

  @property
  def within_noise(self) -> bool:
    """The interval contains 0: no difference can be claimed either way."""
    return self.lo <= 0.0 <= self.hi


def bootstrap(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean,
              n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
  """Percentile bootstrap of `stat` over the units in `values` (resampled with replacement)."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
    raise ValueError(f"bootstrap needs a non-empty 1-D array of finite values, got {x!r}")
  idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
  boots = np.apply_along_axis(stat, 1, x[idx]) if stat is not np.mean else x[idx].mean(1)
  a = (1 - level) / 2
  lo, hi = np.quantile(boots, [a, 1 - a])
  return Interval(float(stat(x)), float(lo), float(hi), int(x.size))


def cluster_bootstrap(groups: Sequence[tuple[np.ndarray, ...]],
                      stat: Callable[..., float], n_boot: int = 2000, level: float = LEVEL,
                      seed: int = 0) -> Interval:
  """Bootstrap over clusters (seeds): each resample draws whole seeds with replacement, pools
  their rows and recomputes `stat(*columns)`. For statistics of pooled pairs, e.g. a rank
  correlation over all (s, tau) task pairs of all seeds, whose pairs within a seed are not
  independent."""
  if not groups:
    raise ValueError("cluster_bootstrap needs at least one group")
  k = len(groups[0])

  def pooled(which):
    return [np.concatenate([np.asarray(groups[g][j], np.float64) for g in which])
            for j in range(k)]
  rng = np.random.default_rng(seed)
  n = len(groups)
  boots = []
  for _ in range(n_boot):
    v = stat(*pooled(rng.integers(0, n, size=n)))
    if np.isfinite(v):
      boots.append(v)
  a = (1 - level) / 2
  lo, hi = np.quantile(boots, [a, 1 - a]) if boots else (np.nan, np.nan)
  return Interval(float(stat(*pooled(range(n)))), float(lo), float(hi), n)


def paired(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]],
           **kwargs) -> Interval:
  """Mean over seeds of a[seed] - b[seed] with its bootstrap interval; only seeds both have."""
  seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
  if not seeds:
    raise ValueError(f"no seed in common between {sorted(a)} and {sorted(b)}")
  return bootstrap([a[s] - b[s] for s in seeds], **kwargs)


def verdict(iv: Interval, prediction: str, margin: float = 0.0) -> str:
  """'holds' / 'fails' / 'inconclusive' for a prediction about the quantity's sign.

  prediction: '>0' or '<0' (a direction), or '=0' (no effect: holds when the whole interval
  lies within +-margin, fails when it excludes the whole band, inconclusive in between)."""
  if not np.isfinite([iv.lo, iv.hi]).all():
    return "inconclusive"
  if prediction == ">0":
    return "holds" if iv.lo > margin else "fails" if iv.hi < margin else "inconclusive"
  if prediction == "<0":
    return "holds" if iv.hi < -margin else "fails" if iv.lo > -margin else "inconclusive"
  if prediction == "=0":
    if margin <= 0:
      raise ValueError("a '=0' prediction needs margin > 0 (the effect size that counts as none)")
    if -margin <= iv.lo and iv.hi <= margin:
      return "holds"
    return "fails" if iv.lo > margin or iv.hi < -margin else "inconclusive"
  raise ValueError(f"prediction {prediction!r}: use '>0', '<0' or '=0'")


def describe(iv: Interval, prediction: str, margin: float = 0.0, digits: int = 2) -> str:
  """The interval, its verdict, "within noise" where the interval contains 0, and a note when
  fewer than MIN_SEEDS units back it."""
  v = verdict(iv, prediction, margin)
  parts = [iv.text(digits), f"**{v}**"]
  if iv.within_noise:
    parts.append("within noise")
  if iv.n < MIN_SEEDS:
    parts.append(f"only {iv.n} seeds")
  return "; ".join(parts)


def rankdata(x: np.ndarray) -> np.ndarray:
  """Average ranks (ties share their mean rank), 0-based."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(x.size)
  ranks[order] = np.arange(x.size)
  _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inv, weights=ranks)
  return (sums / counts)[inv]


def spearman(x, y) -> float:
  rx, ry = rankdata(x), rankdata(y)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def partial_spearman(x, y, control) -> float:
  """Spearman correlation of x and y with `control` partialled out: the Pearson correlation of
  the residuals of rank(x) and rank(y) after a least-squares fit on [1, rank(control)]."""
  rx, ry, rc = rankdata(x), rankdata(y), rankdata(control)
  design = np.stack([np.ones_like(rc), rc], 1)
  res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
  if res[0].std() < 1e-12 or res[1].std() < 1e-12:
    return float("nan")
  return float(np.corrcoef(*res)[0, 1])
