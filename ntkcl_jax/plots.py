"""PNG plots of a continual-learning run: the accuracy-matrix heatmap and accuracy per task.

Both take the (T, T) accuracy matrix of ntkcl_jax.metrics (row t = after task t, column s = test
classes of task s, NaN = not yet seen) and write a PNG file on any path ntkcl_jax.paths accepts
(`gs://...` included: the figure is rendered to bytes, then written whole); no global matplotlib
state is left behind.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ntkcl_jax import paths  # noqa: E402


def _save(fig, path) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  paths.write_bytes_atomic(path, buf.getvalue())
  return str(path)


def accuracy_matrix_heatmap(acc_matrix, path: paths.PathLike, title: str = "") -> str:
  """Heatmap of R with each cell's value written in it; NaN cells are left blank."""
  r = np.asarray(acc_matrix, np.float64)
  t = r.shape[0]
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * t, 0.8 + 0.6 * t))
  im = ax.imshow(np.ma.masked_invalid(r), vmin=0, vmax=100, cmap="viridis")
  for i in range(t):
    for j in range(t):
      if not np.isnan(r[i, j]):
        ax.text(j, i, f"{r[i, j]:.1f}", ha="center", va="center", fontsize=8,
                color="white" if r[i, j] < 60 else "black")
  ax.set_xlabel("test classes of task s")
  ax.set_ylabel("after training task t")
  ax.set_xticks(range(t))
  ax.set_yticks(range(t))
  ax.set_title(title or "accuracy matrix (%)")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  return _save(fig, path)


def accuracy_per_task(acc_matrix, path: paths.PathLike,
                      step_accuracy: Optional[Sequence[float]] = None,
                      title: str = "") -> str:
  """One line per task s: its accuracy after each training step t >= s; the overall
  (sample-weighted) accuracy A_t in bold black when given."""
  r = np.asarray(acc_matrix, np.float64)
  t = r.shape[0]
  fig, ax = plt.subplots(figsize=(6, 4))
  for s in range(t):
    xs = np.arange(s, t)
    ys = r[s:, s]
    ok = ~np.isnan(ys)
    if ok.any():
      ax.plot(xs[ok], ys[ok], marker="o", lw=1, label=f"task {s}")
  if step_accuracy is not None:
    a = np.asarray(step_accuracy, np.float64)
    ax.plot(np.arange(len(a)), a, color="black", lw=2.5, marker="s", label="all seen (A_t)")
  ax.set_xlabel("after training task t")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_xticks(range(t))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(title or "accuracy per task")
  fig.tight_layout()
  return _save(fig, path)
