"""ntkcl_jax.metrics against values computed by hand from the definitions in ntkcl_jax/metrics.py."""
import math

import numpy as np
import pytest

from ntkcl_jax import metrics

NAN = float("nan")
# Three tasks. Row t = after training task t, column s = test classes of task s.
R = [[90.0, NAN, NAN],
     [70.0, 80.0, NAN],
     [60.0, 85.0, 50.0]]


def test_forgetting_is_max_based_not_first_minus_last():
  # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 85 = -5  -> mean 12.5
  assert metrics.forgetting(R) == pytest.approx(12.5)
  # Avalanche's first-minus-last would give the same here; make the max matter:
  r2 = [[50.0, NAN, NAN], [70.0, 80.0, NAN], [60.0, 85.0, 50.0]]
  # task 0: max(50, 70) - 60 = 10 (first-minus-last would be -10); task 1: -5 -> 2.5
  assert metrics.forgetting(r2) == pytest.approx(2.5)


def test_backward_transfer_and_learning_accuracy():
  # BWT: ((60 - 90) + (85 - 80)) / 2 = -12.5 ; LA: (90 + 80 + 50) / 3
  assert metrics.backward_transfer(R) == pytest.approx(-12.5)
  assert metrics.learning_accuracy(R) == pytest.approx(220 / 3)


def test_partial_matrix_uses_filled_rows_only():
  r = [[90.0, NAN, NAN], [70.0, 80.0, NAN], [NAN, NAN, NAN]]
  assert metrics.forgetting(r) == pytest.approx(20.0)
  assert metrics.backward_transfer(r) == pytest.approx(-20.0)
  assert metrics.task_averaged_accuracy(r) == pytest.approx([90.0, 75.0])
  assert metrics.forgetting([[90.0, NAN], [NAN, NAN]]) is None


def test_sample_weighted_differs_from_task_mean():
  # 100 test images in task 0, 300 in task 1: (60*100 + 85*300) / 400 = 78.75, task mean 72.5.
  assert metrics.sample_weighted_accuracy([60.0, 85.0, NAN], [100, 300, 50]) == pytest.approx(78.75)
  assert metrics.task_averaged_accuracy(R)[1] == pytest.approx(75.0)


def test_official_rounding_and_average():
  assert metrics.official_step_accuracy(2, 3) == 66.67
  steps = [90.0, 75.0, 65.0]
  s = metrics.summarize(R, steps)
  assert s["avg_incremental_accuracy"] == pytest.approx(230 / 3)
  assert s["last_accuracy"] == 65.0
  assert s["forgetting"] == pytest.approx(12.5)
  with pytest.raises(ValueError, match="step accuracies"):
    metrics.summarize(R, steps[:2])


def test_rejects_non_square():
  with pytest.raises(ValueError, match="square"):
    metrics.forgetting(np.zeros((2, 3)))
  assert math.isnan(np.asarray(R)[0, 1])
