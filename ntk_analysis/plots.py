"""Plots for the experiment tables (matplotlib, Agg); every function takes a DataFrame."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def scree(spectra, path=None):
  """Recipe (e): log eigenvalue vs index, one line per (checkpoint, task)."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for (ckpt, task), g in spectra.groupby(["checkpoint", "task"]):
    ax.semilogy(g["index"], np.clip(g["eigenvalue"], 1e-12, None), label=f"{ckpt} task {task}")
  ax.set_xlabel("eigenvalue index")
  ax.set_ylabel("lambda / tr K")
  ax.legend(fontsize=6)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
  return fig


def pair_heatmap(pairs, value="rho", path=None):
  """Recipe (a): task-pair matrix of `value` (symmetrised)."""
  tasks = sorted(set(pairs["s"]) | set(pairs["t"]))
  m = np.full((len(tasks), len(tasks)), np.nan)
  pos = {t: i for i, t in enumerate(tasks)}
  for _, r in pairs.iterrows():
    m[pos[r["s"]], pos[r["t"]]] = m[pos[r["t"]], pos[r["s"]]] = r[value]
  fig, ax = plt.subplots(figsize=(4, 3.5))
  im = ax.imshow(m, cmap="viridis")
  ax.set_xticks(range(len(tasks)), tasks)
  ax.set_yticks(range(len(tasks)), tasks)
  ax.set_title(value)
  fig.colorbar(im)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
  return fig
