"""Plots of a run's task kernels (matplotlib, Agg): the joint kernel with task boundaries, the
inter-task alignment matrix, per-task spectra, and an x/y scatter for the theory checks."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntk_analysis import metrics  # noqa: E402


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def joint_kernel(jk, path: str, title: str = "") -> str:
  fig, ax = plt.subplots(figsize=(5, 4.5))
  im = ax.imshow(jk.k, cmap="viridis")
  for t in jk.tasks[1:]:
    b = jk.rows(t)[0] - 0.5
    ax.axhline(b, color="w", lw=0.6)
    ax.axvline(b, color="w", lw=0.6)
  ax.set_title(title or "joint NTK (rows/cols grouped by task)")
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def alignment_matrix(jk, path: str, title: str = "") -> str:
  t = len(jk.tasks)
  rho = np.eye(t)
  for i, s in enumerate(jk.tasks):
    for j, u in enumerate(jk.tasks):
      if s != u:
        rho[i, j] = metrics.alignment(jk.block(s, s), jk.block(u, u), jk.block(s, u))
  fig, ax = plt.subplots(figsize=(4.5, 4))
  im = ax.imshow(rho, vmin=0, vmax=1, cmap="magma")
  for i in range(t):
    for j in range(t):
      ax.text(j, i, f"{rho[i, j]:.2f}", ha="center", va="center", color="c", fontsize=8)
  ax.set_xlabel("task")
  ax.set_ylabel("task")
  ax.set_title(title or "inter-task alignment |K_st| / sqrt(|K_ss| |K_tt|)", fontsize=9)
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def spectra(jk, path: str, title: str = "") -> str:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for t in jk.tasks:
    w = metrics.spectrum(jk.block(t, t))
    ax.semilogy(np.arange(1, len(w) + 1), np.maximum(w, 1e-12), label=f"task {t}")
  ax.set_xlabel("eigenvalue index")
  ax.set_ylabel("eigenvalue of K(X_t, X_t)")
  ax.set_title(title or "intra-task NTK spectra")
  ax.legend(fontsize=7)
  return _save(fig, path)


def scatter(x, y, path: str, xlabel: str, ylabel: str, title: str, labels=None) -> str:
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  ax.scatter(x, y)
  for i, lab in enumerate(labels or []):
    ax.annotate(str(lab), (x[i], y[i]), fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  return _save(fig, path)
