"""Experiment recipes over joint kernels -> tidy pandas DataFrames (spec ntk_analysis.md 4).

Phase-2 start: the kernel-side tables of recipes (a) and (e), generic over JointKernel objects.
The model adapter (params per checkpoint, readouts, per-task data) and training loops come next.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pandas as pd

from ntk_analysis import joint, metrics


def pair_table(jk: joint.JointKernel, residuals: Optional[Mapping[int, np.ndarray]] = None,
               lam: float = 1e-3, top_k: int = 3) -> pd.DataFrame:
  """Recipe (a): one row per task pair s < t: rho, mean top-k principal cosine, mean |tangent
  cosine| (inter), and with residuals R_t the predicted interference F_hat(s<-t) (2.2)."""
  rows = []
  cos = metrics.tangent_cosines(jk.k)
  for (s, t), k_st in jk.inter().items():
    k_ss, k_tt = jk.block(s, s), jk.block(t, t)
    ang = metrics.principal_angles_blocks(k_ss, k_tt, k_st)
    row = {"s": s, "t": t, "rho": metrics.alignment(k_ss, k_tt, k_st),
           "principal_cos_topk": float(ang[:top_k].mean()) if ang.size else 0.0,
           "tangent_cos_inter": float(np.abs(cos[np.ix_(jk.rows(s), jk.rows(t))]).mean())}
    if residuals is not None:
      row["F_hat"] = metrics.predicted_interference(k_st, k_tt, residuals[t], lam)[1]
      row["lam"] = lam
    rows.append(row)
  return pd.DataFrame(rows)


def spectrum_table(kernels_by_checkpoint: Mapping[str, joint.JointKernel]) -> pd.DataFrame:
  """Recipe (e): per (checkpoint, task): trace-normalised eigenvalues, r_eff (both forms), kappa;
  one row per eigenvalue index (tidy)."""
  rows = []
  for ckpt, jk in kernels_by_checkpoint.items():
    for t, k_tt in jk.intra().items():
      w = metrics.spectrum(k_tt)
      base = {"checkpoint": ckpt, "task": t, "r_eff_entropy": metrics.effective_rank(k_tt),
              "r_eff_trace": metrics.effective_rank_trace(k_tt),
              "kappa": metrics.condition_number(k_tt)}
      rows += [dict(base, index=i, eigenvalue=float(v / w.sum())) for i, v in enumerate(w)]
  return pd.DataFrame(rows)


def drift_table(kernels_by_checkpoint: Mapping[str, joint.JointKernel]) -> pd.DataFrame:
  """Recipe (e)/(d): S(K_tt(first checkpoint), K_tt(c)) per old task t and later checkpoint c."""
  items = list(kernels_by_checkpoint.items())
  ref_name, ref = items[0]
  rows = []
  for ckpt, jk in items:
    for t in jk.tasks:
      rows.append({"reference": ref_name, "checkpoint": ckpt, "task": t,
                   "S": metrics.kernel_distance(ref.block(t, t), jk.block(t, t)),
                   "relative_change": metrics.relative_change(ref.block(t, t), jk.block(t, t))})
  return pd.DataFrame(rows)
