"""Continual-learning metrics from the accuracy matrix, with the definitions written down.

Notation. Tasks are indexed from 0. R is a (T, T) array in percent:
R[t, s] = top-1 accuracy, with the full class-incremental head over all classes seen so far, on the
test images of the classes of task s, measured right after training task t. Entries with s > t
are NaN (not yet seen). A_t is the accuracy after task t over *all* test images of the classes seen
so far (sample-weighted, as the official NTK-CL / PILOT code computes it; it equals the mean of row
t only when every task has the same number of test images).

* average incremental accuracy  Ā   = (1/T) Σ_t A_t            (official "Average Accuracy (CNN)")
* last accuracy                 A_T = A_{T-1}
* forgetting (Chaudhry et al. 2018, max-based)
      F = 1/(T-1) Σ_{s<T-1} [ max_{s<=t<T-1} R[t, s]  -  R[T-1, s] ]
* backward transfer (Lopez-Paz & Ranzato 2017)
      BWT = 1/(T-1) Σ_{s<T-1} ( R[T-1, s] - R[s, s] )
* learning accuracy (plasticity, L2P's `learning_acc`)   LA = (1/T) Σ_s R[s, s]
* task-averaged accuracy after task t (L2P's `avg_acc`)  mean_{s<=t} R[t, s]

Forgetting and BWT are undefined (None) for a single task. The official code rounds each A_t to
2 decimals before averaging; `official_step_accuracy` does the same so Ā matches its printout.
All functions are pure and take numpy-convertible inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _matrix(acc_matrix) -> np.ndarray:
  r = np.asarray(acc_matrix, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1]:
    raise ValueError(f"accuracy matrix must be square (T, T), got shape {r.shape}")
  return r


def _seen_rows(r: np.ndarray) -> int:
  """Number of leading rows that are filled (tasks evaluated so far)."""
  filled = ~np.isnan(np.diag(r))
  n = int(np.argmin(filled)) if not filled.all() else len(filled)
  return n


def sample_weighted_accuracy(row: Sequence[float], test_counts: Sequence[int]) -> float:
  """A_t from one row of R and the number of test images per task: Σ n_s R[t,s] / Σ n_s over the
  tasks s seen so far (the non-NaN entries)."""
  row = np.asarray(row, np.float64)
  counts = np.asarray(test_counts, np.float64)
  seen = ~np.isnan(row)
  if not seen.any():
    raise ValueError("row has no evaluated task")
  return float((row[seen] * counts[seen]).sum() / counts[seen].sum())


def official_step_accuracy(correct: int, total: int) -> float:
  """A_t as the official code computes it: 100 * correct / total rounded to 2 decimals."""
  return float(np.around(correct * 100.0 / total, decimals=2))


def avg_incremental_accuracy(step_accuracies: Sequence[float]) -> float:
  """Ā: plain mean of the per-step accuracies A_0..A_{T-1}."""
  a = np.asarray(step_accuracies, np.float64)
  if a.size == 0:
    raise ValueError("no step accuracies")
  return float(a.mean())


def last_accuracy(step_accuracies: Sequence[float]) -> float:
  return float(np.asarray(step_accuracies, np.float64)[-1])


def forgetting(acc_matrix, upto: Optional[int] = None) -> Optional[float]:
  """Max-based forgetting after task `upto` (default: the last filled row)."""
  r = _matrix(acc_matrix)
  last = (_seen_rows(r) - 1) if upto is None else upto
  if last < 1:
    return None
  best = np.max(r[:last, :last], axis=0, where=~np.isnan(r[:last, :last]), initial=-np.inf)
  return float(np.mean(best - r[last, :last]))


def backward_transfer(acc_matrix, upto: Optional[int] = None) -> Optional[float]:
  r = _matrix(acc_matrix)
  last = (_seen_rows(r) - 1) if upto is None else upto
  if last < 1:
    return None
  return float(np.mean(r[last, :last] - np.diag(r)[:last]))


def learning_accuracy(acc_matrix) -> float:
  r = _matrix(acc_matrix)
  n = _seen_rows(r)
  return float(np.mean(np.diag(r)[:n]))


def task_averaged_accuracy(acc_matrix) -> list[float]:
  """L2P's avg_acc after each task: the unweighted mean of the filled part of each row."""
  r = _matrix(acc_matrix)
  return [float(np.mean(r[t, :t + 1])) for t in range(_seen_rows(r))]


def summarize(acc_matrix, step_accuracies: Sequence[float]) -> dict:
  """All scalar metrics of a (possibly partial) run, JSON-ready."""
  r = _matrix(acc_matrix)
  n = _seen_rows(r)
  if len(step_accuracies) != n:
    raise ValueError(f"{len(step_accuracies)} step accuracies for {n} evaluated tasks")
  return {
      "avg_incremental_accuracy": avg_incremental_accuracy(step_accuracies),
      "last_accuracy": last_accuracy(step_accuracies),
      "forgetting": forgetting(r),
      "backward_transfer": backward_transfer(r),
      "learning_accuracy": learning_accuracy(r),
      "task_averaged_accuracy": task_averaged_accuracy(r),
  }
