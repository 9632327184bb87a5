"""Linearised predictors from kernel blocks (docs/ntk_theory.md §3.4), host float64.

kernel_ridge     f(x*) = f0(x*) + K(x*,X) (K + lam I)^-1 (Y - f0(X))
gd_mse           discrete GD on the sum-of-squares loss, step eta, t steps (train and test)
function_space_gd  f_{t+1}(X) = f_t(X) - eta K(X,X) grad_f L(f_t(X)): exact for the linearised
                 model under any loss (CE included)
function_space_sgd the same with a learning rate per step, heavy-ball momentum and a mean CE
                 per head (the linearised counterpart of a training run, experiment (d))
"""
from __future__ import annotations

import numpy as np


def _f64(*xs):
  return [np.asarray(x, np.float64) for x in xs]


def kernel_ridge(k_train, k_test_train, y, f0_train=None, f0_test=None, lam=1e-6):
  k, kx, y = _f64(k_train, k_test_train, y)
  f0_train = np.zeros_like(y) if f0_train is None else np.asarray(f0_train, np.float64)
  f0_test = np.zeros((kx.shape[0],) + y.shape[1:]) if f0_test is None else np.asarray(f0_test,
                                                                                      np.float64)
  alpha = np.linalg.solve(k + lam * np.eye(len(k)), y - f0_train)
  return f0_test + kx @ alpha


def gd_mse(k_train, k_test_train, y, f0_train, f0_test, eta: float, steps: int):
  """(train outputs, test outputs) after `steps` of GD on 0.5 * ||f(X) - Y||^2 (sum loss)."""
  k, kx, y, f0, f0t = _f64(k_train, k_test_train, y, f0_train, f0_test)
  if y.ndim == 1:  # one output: solve as a column
    train, test = gd_mse(k, kx, y[:, None], f0[:, None], f0t[:, None], eta, steps)
    return train[:, 0], test[:, 0]
  w, v = np.linalg.eigh((k + k.T) / 2)
  if eta * w.max() >= 2:
    raise ValueError(f"eta={eta} >= 2/lambda_max={2 / w.max():.3g}: GD diverges; lower eta")
  decay = (1 - eta * w) ** steps
  r0 = f0 - y
  train = y + v @ (decay[:, None] * (v.T @ r0))
  # test: f_t(x*) = f0(x*) - K(x*,X) K^-1 (I - (I - eta K)^t) (f0 - Y), via the eigenbasis
  with np.errstate(divide="ignore", invalid="ignore"):
    g = np.where(w > 1e-12 * w.max(), (1 - decay) / w, eta * steps)
  test = f0t - kx @ (v @ (g[:, None] * (v.T @ r0)))
  return train, test


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def function_space_gd(k_train, k_test_train, f0_train, f0_test, labels, eta: float, steps: int,
                      loss: str = "ce"):
  """Outputs of the linearised model trained by full-batch GD in function space (sum loss)."""
  k, kx, ft, fx = _f64(k_train, k_test_train, f0_train, f0_test)
  y = np.eye(ft.shape[1])[np.asarray(labels)]
  for _ in range(steps):
    grad = (softmax(ft) - y) if loss == "ce" else (ft - y)
    ft, fx = ft - eta * k @ grad, fx - eta * kx @ grad
  return ft, fx


def function_space_sgd(k_full, f0, train_rows, labels, lrs, momentum: float = 0.0,
                       heads: int = 1) -> np.ndarray:
  """Outputs (N, O) of the linearised model after SGD with momentum on the training rows.

  The model is f(p) = f0 + J (p - p0) with K = J J^T given as (N, N, O, O) or (N O, N O)
  (sample-major); the loss is the mean over the training rows of the sum over `heads` blocks of
  C = O / heads logits of each block's cross-entropy with `labels` (one per training row). The
  parameter update of torch SGD, b <- m b + g, p <- p - lr b, maps to u <- m u + K grad_f L,
  f <- f - lr u (u = J b), so this is exact for the linear model (docs/ntk_theory.md §3.4).
  `lrs`: the learning rate of each step, in order."""
  f = np.array(f0, np.float64)
  n, o = f.shape
  k = np.asarray(k_full, np.float64)
  if k.ndim == 4:
    k = k.transpose(0, 2, 1, 3).reshape(n * o, n * o)
  if k.shape != (n * o, n * o):
    raise ValueError(f"kernel of shape {k.shape} for outputs of shape {f.shape}")
  if o % heads:
    raise ValueError(f"{o} outputs do not split into {heads} heads")
  rows = np.asarray(train_rows)
  c = o // heads
  y = np.eye(c)[np.asarray(labels)]
  if len(y) != len(rows):
    raise ValueError(f"{len(y)} labels for {len(rows)} training rows")
  k_cols = k.reshape(n, o, n, o)[:, :, rows, :].reshape(n * o, len(rows) * o)
  u = np.zeros(n * o)
  for lr in lrs:
    z = f[rows].reshape(len(rows), heads, c)
    g = (softmax(z) - y[:, None, :]) / len(rows)  # d(mean over rows of sum over heads of CE)
    u = momentum * u + k_cols @ g.reshape(-1)
    f = f - lr * u.reshape(n, o)
  return f


def accuracy(outputs, labels) -> float:
  return float((np.asarray(outputs).argmax(-1) == np.asarray(labels)).mean() * 100)


def gd_mse_continuous(k_train, k_test_train, y, f0_train, f0_test, eta: float, time: float):
  """Gradient flow on 0.5 * ||f(X) - Y||^2 / |Y| (neural-tangents' `gradient_descent_mse`
  normalisation): f_t(X) = Y + exp(-eta t K / |Y|)(f0 - Y), test via K(x*,X) K^-1 (I - e^..)."""
  k, kx, y, f0, f0t = _f64(k_train, k_test_train, y, f0_train, f0_test)
  if y.ndim == 1:  # one output: solve as a column
    train, test = gd_mse_continuous(k, kx, y[:, None], f0[:, None], f0t[:, None], eta, time)
    return train[:, 0], test[:, 0]
  w, v = np.linalg.eigh((k + k.T) / 2)
  rate = eta * time / y.size
  decay = np.exp(-rate * np.clip(w, 0, None))
  r0 = f0 - y
  train = y + v @ (decay[:, None] * (v.T @ r0))
  with np.errstate(divide="ignore", invalid="ignore"):
    g = np.where(w > 1e-12 * w.max(), (1 - decay) / w, rate)
  test = f0t - kx @ (v @ (g[:, None] * (v.T @ r0)))
  return train, test


def recursive_cl(kernels_per_task, train_rows, test_rows, targets, f0, *, lam: float = 1e-3,
                 mode: str = "ridge", eta: float = 0.1, steps: int = 100) -> np.ndarray:
  """Predicted accuracy matrix A_hat[t, tau] (docs/ntk_theory.md §3.4, Bennani/Doan recursion).

  kernels_per_task[t]: a joint kernel over all rows (train and test subsets of every task) taken
  at theta_t^0 (pass the same kernel T times for the lazy picture, refreshed ones for semi-lazy).
  Task t moves every row's output by K(., X_t)(K_tt + lam I)^-1 R_t (mode='ridge', MSE) or by
  function-space CE GD on X_t (mode='ce'). targets: (rows, C) one-hot; f0: (rows, C).
  """
  f = np.asarray(f0, np.float64).copy()
  y = np.asarray(targets, np.float64)
  tasks = len(train_rows)
  acc = np.zeros((tasks, tasks))
  for t in range(tasks):
    k = np.asarray(kernels_per_task[t], np.float64)
    tr = np.asarray(train_rows[t])
    k_tt, k_all_t = k[np.ix_(tr, tr)], k[:, tr]
    if mode == "ridge":
      f = f + k_all_t @ np.linalg.solve(k_tt + lam * np.eye(len(tr)), y[tr] - f[tr])
    elif mode == "ce":
      for _ in range(steps):
        f = f - eta * k_all_t @ (softmax(f[tr]) - y[tr])
    else:
      raise ValueError(f"mode={mode!r}: 'ridge' or 'ce'")
    for s in range(tasks):
      te = np.asarray(test_rows[s])
      acc[t, s] = accuracy(f[te], y[te].argmax(-1))
  return acc
