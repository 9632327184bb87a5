"""Kernel metrics (spec ntk_analysis.md 2.2), all on host float64 numpy.

Blocks of a joint kernel: K_tt (intra-task), K_st (inter-task). Definitions:
  frob(K)                 Frobenius norm
  alignment rho(s, t)     ||K_st||_F / sqrt(||K_ss||_F ||K_tt||_F)  in [0, 1] (PSD joint kernel)
  effective_rank(K)       (tr K)^2 / ||K||_F^2 ... we use the entropy form exp(H(lambda/sum))
  kernel_distance(K1,K2)  S = 1 - <K1, K2>_F / (||K1|| ||K2||)   (Fort et al. 2020)
  kta(K, y)               kernel-target alignment <K, Y Y^T>_F / (||K|| ||Y Y^T||)
  principal_angles        between the tangent feature spaces of two tasks, from kernel blocks
"""
from __future__ import annotations

import numpy as np


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
