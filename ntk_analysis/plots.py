"""Every plot of ntk_analysis (matplotlib, Agg): a run's joint kernel, alignment matrix and
per-task spectra, and the figures of experiments (a)-(f). Each writes a PNG and returns its path."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  # pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ntk_analysis import metrics  # noqa: E402


def _save(fig, path: str, dpi: int = 100) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def joint_kernel(jk, path: str, title: str = "") -> str:
  """The joint kernel with white lines at the task boundaries."""
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
  """rho(s, t) for every task pair (1 on the diagonal)."""
  t = len(jk.tasks)
  rho = np.eye(t)
  for i, s in enumerate(jk.tasks):
    for j, u in enumerate(jk.tasks):
      if s != u:
        rho[i, j] = jk.alignment(s, u)
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
  """Eigenvalues of each intra-task block K(X_t, X_t), log scale."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for t in jk.tasks:
    w = metrics.spectrum(jk.block(t, t))
    ax.semilogy(np.arange(1, len(w) + 1), np.maximum(w, 1e-12), label=f"task {t}")
  ax.set_xlabel("eigenvalue index")
  ax.set_ylabel("eigenvalue of K(X_t, X_t)")
  ax.set_title(title or "intra-task NTK spectra")
  ax.legend(fontsize=7)
  return _save(fig, path)


def _two_panels(path: str, draw) -> str:
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  draw(axes)
  return _save(fig, path, dpi=110)


def overlap_vs_forgetting(df: pd.DataFrame, corr: dict, path: str) -> str:
  """(a): accuracy drop of task s against rho and the principal cosines, one point per pair."""
  def draw(axes):
    for ax, col in zip(axes, ("rho", "principal_cos_topk")):
      ax.scatter(df[col], df["accuracy_drop"], s=14)
      ax.set_xlabel(col + " at theta_t^0")
      ax.set_ylabel("accuracy drop of task s (points)")
      ax.set_title(f"(a) Spearman {corr[col]:.2f}")
  return _two_panels(path, draw)


def sweep(path: str, g: pd.DataFrame, group: str, x: str, curves, ylabels) -> str:
  """(b), (f): two panels over a log-scaled sweep variable x (0 drawn at 1e-5), one line per
  group value and curve (axis, column, style, label format)."""
  def draw(axes):
    for value, d in g.groupby(group):
      for ax, col, style, label in curves:
        axes[ax].plot(np.maximum(d[x], 1e-5), d[col], style, label=label.format(value))
    for ax, yl in zip(axes, ylabels):
      ax.set_xscale("log")
      ax.set_xlabel(f"{x} (0 plotted at 1e-5)")
      ax.set_ylabel(yl)
      ax.legend(fontsize=7)
  return _two_panels(path, draw)


def sample_size_and_views(g: pd.DataFrame, slopes: dict, views, path: str) -> str:
  """(c): gap against N per branch (log-log), and the effective rank of each view."""
  def draw(axes):
    for m, d in g.groupby("method"):
      axes[0].plot(d["n_per_class"], np.maximum(d["gap"], 1e-2), "o-",
                   label=f"{m} (slope {slopes[m]:.2f})")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training images per class N")
    axes[0].set_ylabel("train - test accuracy at theta_T")
    axes[0].legend(fontsize=7)
    if views:
      axes[1].bar(list(views["r_eff"]), list(views["r_eff"].values()))
      axes[1].set_ylabel("mean intra-task effective rank")
      axes[1].set_title(f"ratio all/fused {views['ratio_all_over_fused']:.2f} (claim: ~3)")
  return _two_panels(path, draw)


def lazy_regime(df: pd.DataFrame, path: str) -> str:
  """(d): S to the task-start kernel and e_lin, checkpoint by checkpoint."""
  def draw(axes):
    axes[0].plot(df["step"], df["S_to_task_start"], ".-")
    axes[1].plot(df["step"], df["e_lin"], ".-")
    for ax, yl in zip(axes, ("S(K(theta_t^0), K(theta))", "e_lin vs previous checkpoint")):
      for _, d in df.groupby("task"):
        ax.axvline(d["step"].min(), color="grey", lw=0.5)
      ax.set_xlabel("global step (grey: task starts)")
      ax.set_ylabel(yl)
  return _two_panels(path, draw)


def spectra_and_drift(spec: pd.DataFrame, drift: pd.DataFrame, path: str) -> str:
  """(e): trace-normalised spectra at theta_t, and each old task's kernel drift to theta_T."""
  def draw(axes):
    for t, d in spec[spec["at"] == "theta_t"].groupby("task"):
      axes[0].semilogy(d["index"], np.maximum(d["eigenvalue"], 1e-12), label=f"task {t}")
    axes[0].set_xlabel("eigenvalue index")
    axes[0].set_ylabel("trace-normalised eigenvalue at theta_t")
    axes[0].legend(fontsize=7)
    axes[1].bar(drift["task"], drift["drift_S"])
    axes[1].set_xlabel("old task t")
    axes[1].set_ylabel("S(K_tt(theta_t), K_tt(theta_T))")
  return _two_panels(path, draw)
