"""Paired bootstrap intervals and verdicts (ntkcl_jax.evidence) against closed forms and scipy."""
import numpy as np
import pytest
from scipy import stats

from ntkcl_jax import evidence


def test_bootstrap_interval_matches_normal_theory_for_a_large_sample():
  x = np.random.default_rng(0).normal(3.0, 2.0, size=400)
  iv = evidence.bootstrap(x)
  half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
  assert iv.estimate == pytest.approx(x.mean())
  assert iv.lo == pytest.approx(x.mean() - half, abs=0.1 * half)
  assert iv.hi == pytest.approx(x.mean() + half, abs=0.1 * half)
  assert iv.n == 400


def test_paired_uses_per_seed_differences_of_common_seeds():
  a = {0: 10.0, 1: 12.0, 2: 11.0, 3: None, 7: 5.0}
  b = {0: 9.0, 1: 10.0, 2: 11.5, 3: 4.0}
  iv = evidence.paired(a, b)
  assert iv.n == 3 and iv.estimate == pytest.approx(np.mean([1.0, 2.0, -0.5]))
  assert iv.lo >= -0.5 and iv.hi <= 2.0  # a resampled mean stays within the observed range
  with pytest.raises(ValueError, match="no seed in common"):
    evidence.paired({0: 1.0}, {1: 1.0})


def test_a_constant_difference_has_a_degenerate_interval():
  iv = evidence.paired({s: s + 2.0 for s in range(5)}, {s: float(s) for s in range(5)})
  assert (iv.estimate, iv.lo, iv.hi) == (2.0, 2.0, 2.0)
  assert evidence.verdict(iv, ">0") == "holds" and evidence.verdict(iv, "<0") == "fails"


@pytest.mark.parametrize("lo,hi,pred,margin,want", [
    (0.5, 2.0, ">0", 0, "holds"), (-2.0, -0.5, ">0", 0, "fails"), (-0.5, 2.0, ">0", 0, "inconclusive"),
    (-2.0, -0.5, "<0", 0, "holds"), (0.5, 2.0, "<0", 0, "fails"), (-1.0, 0.1, "<0", 0, "inconclusive"),
    (-0.2, 0.3, "=0", 0.5, "holds"), (0.6, 0.9, "=0", 0.5, "fails"), (-0.2, 0.9, "=0", 0.5, "inconclusive"),
])
def test_verdict_is_read_off_the_interval(lo, hi, pred, margin, want):
  iv = evidence.Interval((lo + hi) / 2, lo, hi, 5)
  assert evidence.verdict(iv, pred, margin) == want
  text = evidence.describe(iv, pred, margin)
  assert want in text and (("within noise" in text) == (lo <= 0 <= hi))


def test_verdict_rejects_unknown_predictions_and_a_null_without_margin():
  iv = evidence.Interval(0, -1, 1, 5)
  with pytest.raises(ValueError):
    evidence.verdict(iv, "positive")
  with pytest.raises(ValueError, match="margin"):
    evidence.verdict(iv, "=0")


def test_describe_flags_too_few_seeds():
  assert "only 3 seeds" in evidence.describe(evidence.Interval(1, 0.5, 2, 3), ">0")
  assert "seeds" not in evidence.describe(evidence.Interval(1, 0.5, 2, 5), ">0")


def test_ranks_and_spearman_match_scipy():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 6, size=50).astype(float)  # with ties
  y = x + rng.normal(size=50)
  np.testing.assert_allclose(evidence.rankdata(x), stats.rankdata(x) - 1)
  assert evidence.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_partial_spearman_equals_the_closed_form_and_removes_a_confounder():
  rng = np.random.default_rng(2)
  age = rng.integers(1, 5, size=3000).astype(float)
  x = age + rng.normal(size=age.size)  # both follow task age, not each other
  y = age + rng.normal(size=age.size)
  rx, ry, rz = (stats.rankdata(v) for v in (x, y, age))
  r = lambda a, b: np.corrcoef(a, b)[0, 1]
  closed = (r(rx, ry) - r(rx, rz) * r(ry, rz)) / np.sqrt((1 - r(rx, rz) ** 2) *
                                                         (1 - r(ry, rz) ** 2))
  got = evidence.partial_spearman(x, y, age)
  assert got == pytest.approx(closed, abs=1e-10)
  assert evidence.spearman(x, y) > 0.4 and abs(got) < 0.06


def test_cluster_bootstrap_resamples_whole_seeds():
  same = [(np.arange(6.0), 2 * np.arange(6.0))] * 4  # identical seeds: no spread to find
  iv = evidence.cluster_bootstrap(same, evidence.spearman, n_boot=200)
  assert (iv.estimate, iv.lo, iv.hi, iv.n) == (1.0, 1.0, 1.0, 4)
  rng = np.random.default_rng(3)
  noisy = [(rng.normal(size=10), rng.normal(size=10)) for _ in range(6)]
  iv = evidence.cluster_bootstrap(noisy, evidence.spearman, n_boot=300)
  assert iv.lo < iv.estimate < iv.hi and iv.n == 6
