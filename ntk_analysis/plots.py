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


def interference_scatter(rows: list, path: str) -> str:
  """(a): net drop of task s while tau trains against the interference term (left) and the
  centred rho (right) at theta_tau^0, one point per pair and seed, coloured by the lag."""
  df = pd.DataFrame(rows)

  def draw(axes):
    for ax, col in zip(axes, ("interference", "rho_centred")):
      sc = ax.scatter(df[col], df["net_drop"], c=df["lag"], s=16, cmap="viridis")
      ax.set_xscale("log" if col == "interference" and (df[col] > 0).all() else "linear")
      ax.set_xlabel(f"{col} at theta_tau^0")
      ax.set_ylabel("net drop of task s (points, minus SimpleCIL's)")
    axes[0].figure.colorbar(sc, ax=axes[1], label="lag tau - s")
  return _two_panels(path, draw)


def findings(rows: list, path: str, title: str = "") -> str:
  """Each finding as its estimate with the t interval, and the threshold its prediction names
  as a red tick (an experiment's results at a glance)."""
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
  y = np.arange(len(rows))[::-1]
  for yi, r in zip(y, rows):
    est, lo, hi = (float(r[k]) if r[k] is not None else np.nan for k in ("estimate", "lo", "hi"))
    colour = {"holds": "tab:green", "fails": "tab:red"}.get(r.get("verdict"), "tab:blue")
    ax.errorbar(est, yi, xerr=[[np.nan_to_num(est - lo)], [np.nan_to_num(hi - est)]], fmt="o",
                color=colour, capsize=3, ms=4)
  ax.axvline(0, color="grey", lw=0.6)
  ax.set_yticks(y)
  ax.set_yticklabels([r["quantity"][:70] for r in rows], fontsize=7)
  ax.set_xlabel("estimate and Student-t 95% interval (green: holds, red: fails)")
  ax.set_title(title, fontsize=9)
  return _save(fig, path, dpi=110)


def group_shares(table: list, groups: dict, path: str) -> str:
  """(e): each parameter group's share of the parameters and of the raw and centred kernel
  trace (means over seeds)."""
  names = [r["group"] for r in table]
  keys = ("param_share", "trace_share", "centred_share")
  means = {k: [float(np.mean([v[k] for v in groups[g]])) for g in names] for k in keys}
  fig, ax = plt.subplots(figsize=(8, 3.6))
  x = np.arange(len(names))
  for i, k in enumerate(keys):
    ax.bar(x + (i - 1) * 0.27, means[k], width=0.27, label=k.replace("_", " "))
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
  ax.set_ylabel("share")
  ax.legend(fontsize=7)
  return _save(fig, path, dpi=110)
