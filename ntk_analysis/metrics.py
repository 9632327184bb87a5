"""Kernel metrics (docs/ntk_theory.md §2.2), all on host float64 numpy.

Blocks of a joint kernel: K_tt (intra-task), K_st (inter-task). Definitions:
  frob(K)                 Frobenius norm
  alignment rho(s, t)     ||K_st||_F / sqrt(||K_ss||_F ||K_tt||_F)  in [0, 1] (PSD joint kernel)
  effective_rank(K)       (tr K)^2 / ||K||_F^2 ... we use the entropy form exp(H(lambda/sum))
  kernel_distance(K1,K2)  S = 1 - <K1, K2>_F / (||K1|| ||K2||)   (Fort et al. 2020)
  kta(K, y)               kernel-target alignment <K, Y Y^T>_F / (||K|| ||Y Y^T||)
  principal_angles        between the tangent feature spaces of two tasks, from kernel blocks
  centre(K)               H K H, H = I - 11^T/n: the kernel of the tangent features minus their
                          mean, i.e. without the component every sample shares
  top_share(K, m)         share of the trace held by the m largest eigenvalues
and the statistics the experiments share: forgetting_per_task, spearman,
loglog_slope, slope_on_log_x.
"""
from __future__ import annotations

import jax
import numpy as np
import pandas as pd


def frob(k) -> float:
  return float(np.linalg.norm(np.asarray(k, np.float64)))


def alignment(k_ss, k_tt, k_st) -> float:
  """Normalised inter-task kernel mass rho_st = ||K_st|| / sqrt(||K_ss|| ||K_tt||)."""
  d = np.sqrt(frob(k_ss) * frob(k_tt))
  return frob(k_st) / d if d > 0 else 0.0


def spectrum(k) -> np.ndarray:
  """Eigenvalues of a symmetric kernel block, descending, negatives (round-off) clipped to 0."""
  k = np.asarray(k, np.float64)
  w = np.linalg.eigvalsh((k + k.T) / 2)[::-1]
  return np.clip(w, 0, None)


def effective_rank(k) -> float:
  """exp(entropy of the normalised spectrum) (Roy & Vetterli); r_eff(I_n) = n."""
  w = spectrum(k)
  if w.sum() <= 0:
    return 0.0
  p = w / w.sum()
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


def centre(k) -> np.ndarray:
  """H K H with H = I - 11^T / n (row and column means removed): the kernel of the tangent
  features J(x) - mean_x J(x). A component all samples share (a constant c 11^T, or a common
  tangent direction) is removed, so spectra and overlaps describe what differs between samples."""
  k = np.asarray(k, np.float64)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"centre needs a square (n, n) kernel, got shape {k.shape}")
  return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()


def top_share(k, m: int = 3) -> float:
  """Share of the trace held by the m largest eigenvalues (NaN for a zero kernel)."""
  w = spectrum(k)
  return float(w[:m].sum() / w.sum()) if w.sum() > 0 else float("nan")


def kernel_distance(k1, k2) -> float:
  """S(K1, K2) = 1 - cos_F(K1, K2); 0 iff K2 = c K1 with c > 0."""
  k1, k2 = np.asarray(k1, np.float64), np.asarray(k2, np.float64)
  d = frob(k1) * frob(k2)
  return float(1 - (k1 * k2).sum() / d) if d > 0 else 0.0


def kta(k, labels, num_classes=None) -> float:
  """Kernel-target alignment with one-hot targets (Cristianini et al.)."""
  labels = np.asarray(labels)
  c = num_classes or int(labels.max()) + 1
  y = np.eye(c)[labels]
  yy = y @ y.T
  return float((np.asarray(k, np.float64) * yy).sum() / (frob(k) * frob(yy)))


def _factor(k_joint, eps=1e-10):
  """A feature map Phi with Phi Phi^T = K (eigendecomposition), columns with eigenvalue > eps."""
  w, v = np.linalg.eigh((k_joint + k_joint.T) / 2)
  keep = w > eps * max(w.max(), 1e-300)
  return v[:, keep] * np.sqrt(w[keep])


def principal_angles(k_joint, idx_s, idx_t, eps=1e-10) -> np.ndarray:
  """Cosines of the principal angles between span{J(x): x in task s} and task t, from the
  joint kernel alone (Phi Phi^T = K, so Phi's rows are the tangent features up to a rotation)."""
  phi = _factor(np.asarray(k_joint, np.float64), eps)
  a, b = phi[idx_s].T, phi[idx_t].T
  qa, _ = np.linalg.qr(a)
  qb, _ = np.linalg.qr(b)
  ua = qa[:, np.linalg.svd(a, compute_uv=False) > eps * max(1e-300, np.abs(a).max())]
  ub = qb[:, np.linalg.svd(b, compute_uv=False) > eps * max(1e-300, np.abs(b).max())]
  s = np.linalg.svd(ua.T @ ub, compute_uv=False)
  return np.clip(s, 0, 1)


def block_report(k_joint, task_index, labels=None) -> dict:
  """Per task and task pair: norms, rho, effective rank, top eigenvalue, KTA, mean cos of angles."""
  k = np.asarray(k_joint, np.float64)
  task_index = np.asarray(task_index)
  tasks = sorted(set(task_index.tolist()))
  idx = {t: np.flatnonzero(task_index == t) for t in tasks}
  per_task = {}
  for t in tasks:
    b = k[np.ix_(idx[t], idx[t])]
    sp = spectrum(b)
    per_task[str(t)] = {"frob": frob(b), "trace": float(np.trace(b)),
                        "effective_rank": effective_rank(b), "top_eigenvalue": float(sp[0]),
                        "kta": kta(b, np.asarray(labels)[idx[t]]) if labels is not None else None}
  pairs = {}
  for s in tasks:
    for t in tasks:
      if s < t:
        kst = k[np.ix_(idx[s], idx[t])]
        ang = principal_angles(k, idx[s], idx[t])
        pairs[f"{s}-{t}"] = {
            "frob": frob(kst), "rho": alignment(k[np.ix_(idx[s], idx[s])],
                                                k[np.ix_(idx[t], idx[t])], kst),
            "mean_cos_principal_angle": float(ang.mean()) if ang.size else 0.0}
  return {"tasks": per_task, "pairs": pairs}


def effective_rank_trace(k) -> float:
  """r_eff = (tr K)^2 / ||K||_F^2 (docs/ntk_theory.md §2.2); r_eff(I_n) = n."""
  k = np.asarray(k, np.float64)
  f = frob(k)
  return float(np.trace(k) ** 2 / f ** 2) if f > 0 else 0.0


def condition_number(k) -> float:
  w = spectrum(k)
  return float(w[0] / w[-1]) if w[-1] > 0 else float("inf")


def tangent_cosines(k_joint) -> np.ndarray:
  """c(x, x') = K(x, x') / sqrt(K(x, x) K(x', x')) (docs/ntk_theory.md §2.2)."""
  k = np.asarray(k_joint, np.float64)
  d = np.sqrt(np.clip(np.diag(k), 1e-300, None))
  return k / np.outer(d, d)


def principal_angles_blocks(k_ss, k_tt, k_st, rank: int = None, eps: float = 1e-10) -> np.ndarray:
  """cos theta_i = sigma_i(M), M = L_s^-1/2 U_s^T K_st U_t L_t^-1/2 from the top-r eigenpairs of
  K_ss and K_tt (docs/ntk_theory.md §2.2): Doan et al.'s overlap V_s^T V_t without P-dim vectors."""
  def top(k):
    w, u = np.linalg.eigh((np.asarray(k, np.float64) + np.asarray(k, np.float64).T) / 2)
    w, u = w[::-1], u[:, ::-1]
    keep = w > eps * max(w[0], 1e-300)
    if rank is not None:
      keep[rank:] = False
    return w[keep], u[:, keep]
  ws, us = top(k_ss)
  wt, ut = top(k_tt)
  m = (us / np.sqrt(ws)).T @ np.asarray(k_st, np.float64) @ (ut / np.sqrt(wt))
  return np.clip(np.linalg.svd(m, compute_uv=False), 0, 1)


def predicted_interference(k_st, k_tt, residual_t, lam: float) -> tuple[np.ndarray, float]:
  """D(s<-t) = K_st (K_tt + lam I)^-1 R_t and F_hat = ||D||^2 / n_s (docs/ntk_theory.md §2.2, MSE ridge)."""
  k_tt = np.asarray(k_tt, np.float64)
  r = np.asarray(residual_t, np.float64)
  d = np.asarray(k_st, np.float64) @ np.linalg.solve(k_tt + lam * np.eye(len(k_tt)), r)
  return d, float((d ** 2).sum() / d.shape[0])


def complexity(k_tt, residual_t, lam: float) -> float:
  """C_t(lam) = (1/n) sqrt(R^T (K+lam I)^-1 K (K+lam I)^-1 R * tr K) (docs/ntk_theory.md §2.2)."""
  k = np.asarray(k_tt, np.float64)
  r = np.asarray(residual_t, np.float64).reshape(len(k), -1)
  a = np.linalg.solve(k + lam * np.eye(len(k)), r)
  return float(np.sqrt(max(np.einsum("ic,ij,jc->", a, k, a), 0.0) * np.trace(k)) / len(k))


def relative_change(k_old, k_new) -> float:
  """||K' - K||_F / ||K||_F (Bennani's NTK variation)."""
  return frob(np.asarray(k_new, np.float64) - np.asarray(k_old, np.float64)) / frob(k_old)


def kernel_agreement(k, ref) -> dict:
  """One kernel against a reference (e.g. neural-tangents against the JAX backend): max relative
  error max|K - K_ref| / max|K_ref| and Frobenius relative error (both 0 for an all-zero ref)."""
  k, ref = np.asarray(k, np.float64), np.asarray(ref, np.float64)
  scale = np.abs(ref).max()
  if not scale:
    return {"max_rel": 0.0, "fro_rel": 0.0}
  return {"max_rel": float(np.abs(k - ref).max() / scale),
          "fro_rel": float(np.linalg.norm(k - ref) / np.linalg.norm(ref))}


def linearisation_error(f, params_0, params_1, x) -> float:
  """e_lin = ||f(p1) - f(p0) - J(p0)(p1 - p0)|| / ||f(p1) - f(p0)|| (docs/ntk_theory.md §2.2): one JVP."""
  delta = jax.tree_util.tree_map(lambda a, b: b - a, params_0, params_1)
  y0, jd = jax.jvp(lambda p: f(p, x), (params_0,), (delta,))
  y1 = f(params_1, x)
  num = np.linalg.norm(np.asarray(y1 - y0 - jd, np.float64))
  den = np.linalg.norm(np.asarray(y1 - y0, np.float64))
  return float(num / den) if den > 0 else 0.0


def forgetting_per_task(acc) -> np.ndarray:
  """max_{t < T-1} A[t, s] - A[T-1, s] for each task s < T-1 (max-based, as results.json)."""
  a = np.asarray(acc, np.float64)
  last = a.shape[0] - 1
  return np.array([np.nanmax(a[s:last, s]) - a[last, s] for s in range(last)])


def spearman(x, y) -> float:
  """Spearman rank correlation (average ranks for ties); NaN below 3 points or if constant."""
  x, y = pd.Series(list(x), dtype=float), pd.Series(list(y), dtype=float)
  if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
    return float("nan")
  return float(np.corrcoef(x.rank(), y.rank())[0, 1])


def slope_on_log_x(x, y) -> float:
  """Least-squares slope of y on log x, y of any sign; NaN if a value is missing or not finite
  or under 2 distinct x."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0)) or \
      len(set(x)) < 2:
    return float("nan")
  return float(np.polyfit(np.log(x), y, 1)[0])


def loglog_slope(x, y) -> float:
  """Least-squares slope of log y on log x (a power law's exponent); NaN if any y <= 0, where a
  power law has no log (no point is dropped silently), or as slope_on_log_x."""
  y = np.asarray(y, float)
  if not np.all(np.isfinite(y)) or np.any(y <= 0):
    return float("nan")
  return slope_on_log_x(x, np.log(y))
