"""The project's statistics: paired per-seed differences, Student-t intervals, verdicts and rank
correlations. Every number on docs/results*.md and docs/ntk.md comes through here.

A comparison is a difference measured within each seed (same class order, image subsample and
initialisation key), summarised by its mean over the n seeds and the Student-t 95% interval

    mean ± t_{0.975, n-1} · sd / √n          (sd with ddof 1)

A percentile bootstrap of the same n values is printed beside it but never decides: with n = 5 its
interval is about 1.75 standard errors wide on each side against t's 2.78, so it covers about 83%
instead of 95% (tests/test_evidence.py simulates both). A verdict is read off the t interval:

    holds         the interval lies entirely beyond the margin on the side the prediction names
    fails         it lies entirely on the other side of 0 (for a 'no effect' prediction: entirely
                  outside the ±margin band)
    inconclusive  otherwise: an interval that contains 0 ("within noise"), or a same-sign effect
                  that does not clear the margin

    d = paired(ntkcl_by_seed, simplecil_by_seed)      # {seed: value} each
    d.text()          -> '+1.23 [+0.41, +2.05] (n=5)'
    d.boot_text()     -> 'bootstrap [+0.62, +1.88]'
    verdict(d, ">0")  -> 'holds' | 'fails' | 'inconclusive'
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
N_BOOT = 10_000
MIN_SEEDS = 5  # fewer seeds: the pages still print the interval but say so


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean over n units with its Student-t interval [lo, hi] and, beside it, the percentile
  bootstrap interval [boot_lo, boot_hi]. n < 2 leaves both intervals undefined (nan)."""
  estimate: float
  lo: float
  hi: float
  n: int
  boot_lo: float = math.nan
  boot_hi: float = math.nan

  @property
  def defined(self) -> bool:
    return self.n >= 2 and bool(np.isfinite([self.estimate, self.lo, self.hi]).all())

  def text(self, digits: int = 2, signed: bool = True) -> str:
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if not self.defined:
      est = "n/a" if not np.isfinite(self.estimate) else f.format(self.estimate)
      return f"{est} (n={self.n}, no interval)"
    return f"{f.format(self.estimate)} [{f.format(self.lo)}, {f.format(self.hi)}] (n={self.n})"

  def boot_text(self, digits: int = 2, signed: bool = True) -> str:
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if not np.isfinite([self.boot_lo, self.boot_hi]).all():
      return "bootstrap n/a"
    return f"bootstrap [{f.format(self.boot_lo)}, {f.format(self.boot_hi)}]"

  @property
  def within_noise(self) -> bool:
    """The t interval contains 0: no difference can be claimed either way."""
    return self.defined and self.lo <= 0.0 <= self.hi

  def shifted(self, by: float) -> "Interval":
    """The same interval for the quantity minus `by` (a threshold turned into a sign test)."""
    return Interval(self.estimate - by, self.lo - by, self.hi - by, self.n, self.boot_lo - by,
                    self.boot_hi - by)

  def scaled(self, unit: float) -> "Interval":
    """The same interval for the quantity in units of `unit` (divided by it, unit > 0)."""
    return Interval(self.estimate / unit, self.lo / unit, self.hi / unit, self.n,
                    self.boot_lo / unit, self.boot_hi / unit)


def _finite(values) -> np.ndarray:
  x = np.asarray([v for v in values if v is not None], np.float64).reshape(-1)
  return x[np.isfinite(x)]


def t_quantile(n: int, level: float = LEVEL) -> float:
  """t_{(1+level)/2, n-1}: the multiplier of the standard error (2.776 for n = 5)."""
  return float(stats.t.ppf((1 + level) / 2, n - 1))


def percentile_bootstrap(x: np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL,
                         seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of x (resampled with replacement)."""
  idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
  a = (1 - level) / 2
  lo, hi = np.quantile(x[idx].mean(1), [a, 1 - a])
  return float(lo), float(hi)


def t_interval(values: Sequence[Optional[float]], level: float = LEVEL,
               n_boot: int = N_BOOT) -> Interval:
  """Mean of the finite values with its Student-t interval (n - 1 degrees of freedom) and the
  percentile bootstrap beside it. None and non-finite values are left out (n counts the rest)."""
  x = _finite(values)
  if x.size == 0:
    return Interval(math.nan, math.nan, math.nan, 0)
  mean = float(x.mean())
  if x.size < 2:
    return Interval(mean, math.nan, math.nan, int(x.size))
  half = t_quantile(x.size, level) * float(x.std(ddof=1)) / math.sqrt(x.size)
  blo, bhi = percentile_bootstrap(x, n_boot, level)
  return Interval(mean, mean - half, mean + half, int(x.size), blo, bhi)


def common_seeds(*by_seed: Mapping[int, Optional[float]]) -> list:
  """The seeds every mapping has a finite value for, sorted."""
  def ok(m, s):
    return s in m and m[s] is not None and np.isfinite(m[s])
  return sorted(s for s in by_seed[0] if all(ok(m, s) for m in by_seed))


def paired(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]],
           level: float = LEVEL) -> Interval:
  """t_interval of a[seed] - b[seed] over the seeds both have (finite values only); no seed in
  common gives n = 0 (every verdict then 'inconclusive')."""
  seeds = common_seeds(a, b)
  return t_interval([a[s] - b[s] for s in seeds], level)


def verdict(iv: Interval, prediction: str, margin: float = 0.0) -> str:
  """'holds' / 'fails' / 'inconclusive' for a prediction about the quantity, read off the t
  interval (module docstring). prediction: '>0' or '<0' (a direction; with margin > 0 the effect
  must clear it to hold, and a same-sign effect inside it is inconclusive) or '=0' (no effect:
  holds when the whole interval lies within ±margin, fails when it lies wholly outside)."""
  if prediction not in (">0", "<0", "=0"):
    raise ValueError(f"prediction {prediction!r}: use '>0', '<0' or '=0'")
  if margin < 0:
    raise ValueError(f"margin={margin}: must be >= 0")
  if prediction == "=0" and margin <= 0:
    raise ValueError("a '=0' prediction needs margin > 0 (the effect size that counts as none)")
  if not iv.defined:
    return "inconclusive"
  if prediction == ">0":
    return "holds" if iv.lo > margin else "fails" if iv.hi < 0 else "inconclusive"
  if prediction == "<0":
    return "holds" if iv.hi < -margin else "fails" if iv.lo > 0 else "inconclusive"
  if -margin <= iv.lo and iv.hi <= margin:
    return "holds"
  return "fails" if iv.lo > margin or iv.hi < -margin else "inconclusive"


def describe(iv: Interval, prediction: Optional[str] = None, margin: float = 0.0,
             digits: int = 2) -> str:
  """The t interval, its verdict (when a prediction is given), "within noise" where the interval
  contains 0, a note when fewer than MIN_SEEDS seeds back it, and the bootstrap interval."""
  parts = [iv.text(digits)]
  if prediction is not None:
    parts.append(f"**{verdict(iv, prediction, margin)}**")
  if iv.within_noise:
    parts.append("within noise")
  if few_seeds(iv.n):
    parts.append(few_seeds(iv.n))
  parts.append(iv.boot_text(digits))
  return "; ".join(parts)


def few_seeds(n: int) -> str:
  """'only n seeds' for a result backed by fewer than MIN_SEEDS seeds, else ''."""
  return f"only {n} seed" + ("s" if n != 1 else "") if n < MIN_SEEDS else ""


def spearman(x, y) -> float:
  """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return math.nan
  return float(stats.spearmanr(x, y)[0])


def partial_spearman(x, y, strata) -> float:
  """Spearman correlation of x and y within strata (e.g. task age): ranks of x and y, each
  centred on its stratum's mean, then their Pearson correlation. A common dependence on the
  stratum, monotone or not, cancels; strata of one element carry nothing. nan when nothing is
  left to correlate."""
  rx, ry = (stats.rankdata(np.asarray(v, np.float64)) for v in (x, y))
  g = np.unique(np.asarray(strata), return_inverse=True)[1].reshape(-1)
  counts = np.bincount(g)
  res = [r - (np.bincount(g, weights=r) / counts)[g] for r in (rx, ry)]
  if res[0].std() < 1e-12 or res[1].std() < 1e-12:
    return math.nan
  return float(np.corrcoef(*res)[0, 1])
