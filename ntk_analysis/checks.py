"""Theory checks on a trained run's joint kernels (spec ntk_analysis.md 4), each with the
paper's prediction beside the measurement. Used by `ntk_analysis.run` and the notebooks.

(a) overlap_vs_forgetting  inter-task kernel overlap of each task against its measured forgetting
(b) compare_runs           inter-task alignment of two runs (e.g. official vs fix_orth)
(c) views                  one feature view against the three stacked ("tripled features")
(e) spectra                per-task intra-task spectra and effective ranks
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ntk_analysis import metrics, run_plots


def forgetting_per_task(acc) -> np.ndarray:
  """max_{t < T-1} A[t, s] - A[T-1, s] for each task s < T-1 (max-based, as results.json)."""
  a = np.asarray(acc, np.float64)
  last = a.shape[0] - 1
  return np.array([np.nanmax(a[s:last, s]) - a[last, s] for s in range(last)])


def _rho(jk, s, u):
  return metrics.alignment(jk.block(s, s), jk.block(u, u), jk.block(s, u))


def _spearman(x, y) -> float:
  x, y = pd.Series(list(x)), pd.Series(list(y))
  if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
    return float("nan")
  return float(np.corrcoef(x.rank(), y.rank())[0, 1])


def overlap_vs_forgetting(jk, accuracy_matrix, plot_path=None) -> dict:
  """(a): mean alignment of task s with the later tasks vs the forgetting of task s.
  Paper (spec 2.1): forgetting grows with inter-task kernel overlap (positive correlation)."""
  fg = forgetting_per_task(accuracy_matrix)
  tasks = jk.tasks
  rows = [{"task": s, "mean_rho_with_later_tasks": float(np.mean([_rho(jk, s, u)
                                                                   for u in tasks[i + 1:]])),
           "forgetting": float(fg[i])} for i, s in enumerate(tasks[:-1])]
  df = pd.DataFrame(rows)
  corr = _spearman(df["mean_rho_with_later_tasks"], df["forgetting"]) if len(df) else float("nan")
  if plot_path and len(df):
    run_plots.scatter(df["mean_rho_with_later_tasks"].to_numpy(), df["forgetting"].to_numpy(),
                      plot_path, "mean inter-task alignment rho(s, later tasks)",
                      "forgetting of task s (%)",
                      f"(a) overlap vs forgetting, Spearman {corr:.2f}", list(df["task"]))
  return {"table": df.to_dict("records"), "spearman": corr,
          "prediction": "more inter-task overlap -> more forgetting (positive correlation)",
          "measured": f"Spearman rank correlation {corr:.2f} over {len(df)} tasks",
          "holds": bool(corr > 0) if np.isfinite(corr) else None}


def spectra(jk) -> dict:
  """(e): per-task spectrum summary of K(X_t, X_t)."""
  rows = []
  for t in jk.tasks:
    w = metrics.spectrum(jk.block(t, t))
    rows.append({"task": t, "trace": float(w.sum()), "top_eigenvalue": float(w[0]),
                 "effective_rank": metrics.effective_rank(jk.block(t, t))})
  return {"table": rows}


def views(kernels_by_view: dict) -> dict:
  """(c): intra-task effective rank and mean inter-task alignment per view. The 'tripled
  features' argument predicts a richer intra-task kernel for the stacked views than for one."""
  rows = []
  for view, jk in kernels_by_view.items():
    ts = jk.tasks
    rho = [_rho(jk, s, u) for i, s in enumerate(ts) for u in ts[i + 1:]]
    rows.append({"view": view, "mean_intra_effective_rank": float(np.mean(
        [metrics.effective_rank(jk.block(t, t)) for t in ts])),
                 "mean_inter_alignment": float(np.mean(rho)) if rho else float("nan")})
  df = pd.DataFrame(rows)
  holds = None
  if "all" in set(df["view"]) and len(df) > 1:
    single = df[df["view"] != "all"]["mean_intra_effective_rank"].max()
    holds = bool(df[df["view"] == "all"]["mean_intra_effective_rank"].iloc[0] > single)
  return {"table": df.to_dict("records"), "holds": holds,
          "prediction": "stacked views give a higher intra-task effective rank than one view"}


def compare_runs(kernels_by_run: dict) -> dict:
  """(b): mean inter-task alignment per run; a working orthogonality term should lower it."""
  rows = []
  for name, jk in kernels_by_run.items():
    ts = jk.tasks
    rows.append({"run": name, "mean_inter_alignment": float(np.mean(
        [_rho(jk, s, u) for i, s in enumerate(ts) for u in ts[i + 1:]]))})
  return {"table": rows, "prediction": "a working orthogonality term lowers inter-task alignment"}
