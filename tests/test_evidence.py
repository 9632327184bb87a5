"""Student-t intervals, verdicts and rank correlations (ntkcl_jax.evidence) against closed forms,
scipy and simulation."""
import math

import numpy as np
import pytest
from scipy import stats

from ntkcl_jax import evidence


def test_t_interval_is_the_textbook_formula():
  x = [1.2, 0.4, 2.5, -0.3, 1.1]
  iv = evidence.t_interval(x)
  half = 2.7764451051977987 * np.std(x, ddof=1) / math.sqrt(5)  # t_{0.975, 4}
  assert iv.estimate == pytest.approx(np.mean(x))
  assert (iv.lo, iv.hi) == pytest.approx((np.mean(x) - half, np.mean(x) + half))
  assert iv.n == 5
  assert iv.boot_lo >= min(x) and iv.boot_hi <= max(x)  # a resampled mean stays in range
  assert iv.hi - iv.lo > iv.boot_hi - iv.boot_lo  # the bootstrap is narrower at n = 5


def test_coverage_by_simulation_t_covers_and_the_bootstrap_does_not():
  """Normal differences, n = 5: the t interval covers the true mean about 95% of the time; the
  percentile bootstrap about 83% (why it never decides a verdict)."""
  rng = np.random.default_rng(0)
  sims, true = 2000, 1.3
  t_hits = boot_hits = 0
  for _ in range(sims):
    iv = evidence.t_interval(rng.normal(true, 2.0, size=5), n_boot=1000)
    t_hits += iv.lo <= true <= iv.hi
    boot_hits += iv.boot_lo <= true <= iv.boot_hi
  assert abs(t_hits / sims - 0.95) < 0.015  # 3 standard errors of a 2000-draw proportion
  assert 0.75 < boot_hits / sims < 0.89


def test_paired_uses_per_seed_differences_of_common_finite_seeds():
  a = {0: 10.0, 1: 12.0, 2: 11.0, 3: None, 4: float("nan"), 7: 5.0}
  b = {0: 9.0, 1: 10.0, 2: 11.5, 3: 4.0, 4: 1.0}
  iv = evidence.paired(a, b)
  assert iv.n == 3 and iv.estimate == pytest.approx(np.mean([1.0, 2.0, -0.5]))
  assert evidence.paired({0: 1.0}, {1: 1.0}).n == 0
  assert evidence.verdict(evidence.paired({0: 1.0}, {1: 1.0}), ">0") == "inconclusive"


def test_a_constant_difference_has_a_degenerate_interval():
  iv = evidence.paired({s: s + 2.0 for s in range(5)}, {s: float(s) for s in range(5)})
  assert (iv.estimate, iv.lo, iv.hi) == (2.0, 2.0, 2.0)
  assert evidence.verdict(iv, ">0") == "holds" and evidence.verdict(iv, "<0") == "fails"


@pytest.mark.parametrize("lo,hi,pred,margin,want", [
    (0.5, 2.0, ">0", 0, "holds"), (-2.0, -0.5, ">0", 0, "fails"),
    (-0.5, 2.0, ">0", 0, "inconclusive"),
    (-2.0, -0.5, "<0", 0, "holds"), (0.5, 2.0, "<0", 0, "fails"),
    (-1.0, 0.1, "<0", 0, "inconclusive"),
    (-0.2, 0.3, "=0", 0.5, "holds"), (0.6, 0.9, "=0", 0.5, "fails"),
    (-0.2, 0.9, "=0", 0.5, "inconclusive"),
    # a same-sign effect that does not clear the margin is inconclusive, not a failure
    (0.2, 0.8, ">0", 1.0, "inconclusive"), (1.2, 2.0, ">0", 1.0, "holds"),
    (-0.8, -0.2, "<0", 1.0, "inconclusive"), (-3.0, -1.5, "<0", 1.0, "holds"),
    (-0.8, -0.2, ">0", 1.0, "fails"),
])
def test_verdict_is_read_off_the_t_interval(lo, hi, pred, margin, want):
  iv = evidence.Interval((lo + hi) / 2, lo, hi, 5)
  assert evidence.verdict(iv, pred, margin) == want
  text = evidence.describe(iv, pred, margin)
  assert f"**{want}**" in text and (("within noise" in text) == (lo <= 0 <= hi))


def test_the_bootstrap_never_decides():
  """Five same-sign differences: the bootstrap interval always excludes 0, the t interval need
  not, and the verdict follows t."""
  iv = evidence.t_interval([0.1, 0.2, 3.0, 0.15, 0.05])
  assert iv.boot_lo > 0 and iv.lo < 0
  assert evidence.verdict(iv, ">0") == "inconclusive"
  assert "bootstrap [" in evidence.describe(iv, ">0")


def test_verdict_rejects_unknown_predictions_and_a_null_without_margin():
  iv = evidence.Interval(0, -1, 1, 5)
  with pytest.raises(ValueError):
    evidence.verdict(iv, "positive")
  with pytest.raises(ValueError, match="margin"):
    evidence.verdict(iv, "=0")


def test_one_seed_has_no_interval_and_no_verdict():
  iv = evidence.t_interval([1.0, None])
  assert iv.n == 1 and not iv.defined and "no interval" in iv.text()
  assert evidence.verdict(iv, ">0") == "inconclusive"


def test_describe_flags_too_few_seeds():
  assert "only 3 seeds" in evidence.describe(evidence.Interval(1, 0.5, 2, 3), ">0")
  assert "seeds" not in evidence.describe(evidence.Interval(1, 0.5, 2, 5), ">0")
  one = evidence.describe(evidence.t_interval([1.0]), ">0")
  assert "only 1 seed;" in one and "1 seeds" not in one


def test_spearman_matches_scipy_and_is_nan_for_a_constant():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 6, size=50).astype(float)  # with ties
  y = x + rng.normal(size=50)
  assert evidence.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
  assert math.isnan(evidence.spearman(np.ones(5), np.arange(5.0)))


def test_partial_spearman_centres_ranks_within_strata_and_removes_a_confounder():
  rng = np.random.default_rng(2)
  age = rng.integers(1, 5, size=3000).astype(float)
  x = np.sin(age) + rng.normal(size=age.size)  # both follow task age (not monotonically),
  y = np.sin(age) + rng.normal(size=age.size)  # not each other
  rx, ry = stats.rankdata(x), stats.rankdata(y)
  centred = [r - np.array([r[age == a].mean() for a in age]) for r in (rx, ry)]
  got = evidence.partial_spearman(x, y, age)
  assert got == pytest.approx(np.corrcoef(*centred)[0, 1], abs=1e-10)
  assert evidence.spearman(x, y) > 0.2 and abs(got) < 0.06
  z = x + 0.5 * rng.normal(size=age.size)  # a real link within strata survives
  assert evidence.partial_spearman(x, z, age) > 0.8
  assert math.isnan(evidence.partial_spearman(x[:3], y[:3], [1, 2, 3]))  # strata of one


def test_scaled_divides_every_bound_and_keeps_n():
  x = [2e-6, 3e-6, 1e-6, 4e-6]
  iv = evidence.t_interval(x)
  got = iv.scaled(1e-6)
  want = evidence.t_interval([v * 1e6 for v in x])
  assert got.n == want.n == 4
  for a, b in zip((got.estimate, got.lo, got.hi), (want.estimate, want.lo, want.hi)):
    assert a == pytest.approx(b)
  assert got.boot_lo == pytest.approx(iv.boot_lo * 1e6)
  assert got.boot_hi == pytest.approx(iv.boot_hi * 1e6)
