"""The single-run report of `python -m ntk_analysis.analyse`: descriptions of one run's kernels
(overlap against forgetting per task pair, effective rank per view), no verdict. Verdicts need
seeds and controls: ntk_analysis/judge.py over a sweep of scripts/theory.py.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ntk_analysis import joint, metrics, plots
from ntkcl_jax import evidence
from ntkcl_jax import results as results_lib

TOP_K = 3  # principal cosines averaged per pair
PREDICTION_A = ("forgetting of task s while task tau trains grows with their inter-task kernel "
                "overlap at theta_tau^0 (Doan et al.; NTK-CL's task-interplay term)")


def _results(workdir: str) -> dict:
  res = results_lib.read(workdir)
  if res is None:
    raise FileNotFoundError(f"{workdir}/results.json not found: the run is not finished")
  return res


def task_kernel(workdir: str, t: int) -> joint.JointKernel:
  """The fused-view joint kernel at the end of task t (theta_t = theta_{t+1}^0)."""
  path = joint.task_end_path(workdir, t)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} missing: compute the task-end kernels with `python -m "
                            f"ntk_analysis.analyse --workdir={workdir} --task_ends`")
  return joint.JointKernel.load(path)


def pair_row(jk: joint.JointKernel, s, t, top_k: int = TOP_K) -> dict:
  """Overlap of tasks s and t in one joint kernel: rho, the mean of the top-k principal cosines
  and the mean |tangent cosine| between their samples."""
  ang = metrics.principal_angles_blocks(jk.block(s, s), jk.block(t, t), jk.block(s, t))
  cos = metrics.tangent_cosines(jk.k)[np.ix_(jk.rows(s), jk.rows(t))]
  return {"rho": jk.alignment(s, t),
          "principal_cos_topk": float(ang[:top_k].mean()) if ang.size else 0.0,
          "tangent_cos_inter": float(np.abs(cos).mean())}


def overlap_vs_forgetting(workdirs: Sequence[str], plot_path: Optional[str] = None,
                          top_k: int = TOP_K, kernel: Optional[joint.JointKernel] = None) -> dict:
  """Per run and pair s < t: the overlap (pair_row) of the kernel at theta_t^0 (the end of task
  t-1; `kernel`: one kernel for every t instead) against the drop A[t-1, s] - A[t, s]. A
  description of one run: the verdict of (a) needs seeds and the lag control (`interference`)."""
  rows = []
  for wd in workdirs:
    acc = np.array([[np.nan if v is None else v for v in row]
                    for row in _results(wd)["accuracy_matrix"]], np.float64)
    for t in range(1, acc.shape[0]):
      jk = kernel if kernel is not None else task_kernel(wd, t - 1)
      for s in range(t):
        rows.append({"run": os.path.basename(os.path.normpath(wd)), "s": s, "t": t,
                     **pair_row(jk, s, t, top_k),
                     "accuracy_drop": float(acc[t - 1, s] - acc[t, s])})
  df = pd.DataFrame(rows)
  corr = {c: evidence.spearman(df[c], df["accuracy_drop"]) if len(df) > 2 else float("nan")
          for c in ("rho", "principal_cos_topk")}
  if plot_path and len(df):
    plots.overlap_vs_forgetting(df, corr, plot_path)
  where = ("" if kernel is None else
           f" (one kernel, checkpoint {kernel.meta.get('checkpoint')}: confounded with task age)")
  return {"experiment": "a", "prediction": PREDICTION_A,
          "measured": f"Spearman(rho, drop) = {corr['rho']:.2f}, Spearman(principal cos, drop) "
                      f"= {corr['principal_cos_topk']:.2f} over {len(df)} task pairs of one "
                      f"run{where}; no verdict from one run (scripts/theory.py)",
          "holds": None, "table": df.to_dict("records"),
          "plot": os.path.basename(plot_path) if plot_path else None}


def view_ranks(kernels_by_view: Mapping[str, joint.JointKernel]) -> dict:
  """Mean intra-task effective rank and inter-task alignment per view of one checkpoint. The
  'all' view of ntk_analysis.analyse is the mean of the three views' n x n kernels, not the
  stacked 3n x 3n kernel the 'N -> 3N' reading is about (measure_run's 'views' part)."""
  rows = [{"view": v, "mean_intra_effective_rank": float(np.mean(
      [metrics.effective_rank(jk.block(t, t)) for t in jk.tasks])),
           "mean_inter_alignment": jk.mean_inter_alignment()}
          for v, jk in kernels_by_view.items()]
  r_eff = {r["view"]: r["mean_intra_effective_rank"] for r in rows}
  ratio = (r_eff["all"] / r_eff["fused"] if "all" in r_eff and r_eff.get("fused", 0) > 0
           else None)
  return {"table": rows, "r_eff": r_eff, "ratio_all_over_fused": ratio, "holds": None,
          "prediction": "descriptive: effective rank per view of one checkpoint"}
