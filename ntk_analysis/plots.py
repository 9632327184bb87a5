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


def interference(df: pd.DataFrame, path: str) -> str:
  """(a): DeltaA(s<-tau) against rho_{s,tau} at theta_tau^0, one point per pair and seed,
  coloured by the lag tau - s; right: the same against the centred rho."""
  def draw(axes):
    for ax, col in zip(axes, ("rho", "rho_centred")):
      sc = ax.scatter(df[col], df["drop"], c=df["lag"], s=16, cmap="viridis")
      ax.set_xlabel(f"{col} at theta_tau^0")
      ax.set_ylabel("DeltaA(s <- tau) (points)")
    fig = axes[0].figure
    fig.colorbar(sc, ax=axes[1], label="lag tau - s")
  return _two_panels(path, draw)


def _intervals(ax, rows, labels=None):
  """Horizontal interval bars of finding rows (estimate, lo, hi), one per row."""
  y = np.arange(len(rows))
  est = np.array([r["estimate"] for r in rows], float)
  lo = np.array([r["lo"] for r in rows], float)
  hi = np.array([r["hi"] for r in rows], float)
  ax.errorbar(est, y, xerr=[np.nan_to_num(est - lo), np.nan_to_num(hi - est)], fmt="o",
              capsize=3)
  ax.axvline(0, color="grey", lw=0.6)
  ax.set_yticks(y)
  ax.set_yticklabels(labels or [r["quantity"] for r in rows], fontsize=7)


def orthogonality(table: pd.DataFrame, findings: list, path: str) -> str:
  """(b): paired differences to the zero-weight control with their intervals: mean rho (left)
  and forgetting (right), one row per arm."""
  def draw(axes):
    for ax, key in zip(axes, ("Delta mean rho", "Delta forgetting")):
      rows = [f for f in findings if f["quantity"].endswith(key)]
      _intervals(ax, rows, [f["quantity"].split(":")[0] for f in rows])
      ax.set_xlabel(key + " vs dis_temp=0 (95% interval)")
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * max(4, len(table)) + 1.5))
  draw(axes)
  return _save(fig, path, dpi=110)


def views_and_sample_size(ranks, ratio: dict, gaps, threshold: float, path: str) -> str:
  """(c): per-seed ratio r_eff(stacked) / r_eff(fused) with the criterion line (left); the gap
  against images per class on log-log axes, one line per seed (right)."""
  def draw(axes):
    if ratio:
      axes[0].plot(list(ratio), list(ratio.values()), "o")
      axes[0].axhline(threshold, color="r", lw=0.8, label=f"criterion {threshold:g}")
      axes[0].axhline(3, color="grey", ls="--", lw=0.8, label="3 (N -> 3N)")
      axes[0].axhline(1, color="grey", ls=":", lw=0.8, label="1 (copies)")
      axes[0].set_xlabel("seed")
      axes[0].set_ylabel("r_eff(stacked 3n) / r_eff(fused n)")
      axes[0].legend(fontsize=7)
    if gaps is not None and len(gaps):
      for seed, d in gaps.groupby("seed"):
        d = d.sort_values("n_per_class")
        axes[1].plot(d["n_per_class"], np.maximum(d["gap"], 1e-2), "o-", label=f"seed {seed}")
      axes[1].set_xscale("log")
      axes[1].set_yscale("log")
      axes[1].set_xlabel("training images per class N")
      axes[1].set_ylabel("train - test accuracy at theta_T")
      axes[1].legend(fontsize=7)
  return _two_panels(path, draw)


def laziness(df: pd.DataFrame, e_max: float, agree_min: float, path: str) -> str:
  """(d): e_lin (left) and the linearised run's agreement (right) per task, one line per seed,
  with the criterion lines."""
  def draw(axes):
    for seed, d in df.groupby("seed"):
      axes[0].plot(d["task"], d["e_lin"], "o-", label=f"seed {seed}")
      axes[1].plot(d["task"], d["agreement"], "o-", label=f"seed {seed}")
    axes[0].axhline(e_max, color="r", lw=0.8)
    axes[1].axhline(agree_min, color="r", lw=0.8)
    axes[0].set_ylabel("e_lin, Delta = theta_t - theta_t^0")
    axes[1].set_ylabel("agreement, linearised vs real")
    for ax in axes:
      ax.set_xlabel("task t")
      ax.legend(fontsize=7)
  return _two_panels(path, draw)


def spectra_and_groups(spec: pd.DataFrame, groups, path: str) -> str:
  """(e): mean trace-normalised spectra of the raw and centred task kernels at theta_t (left);
  mean trace share per parameter group, raw and centred (right)."""
  def draw(axes):
    for kind, style in (("raw", "o-"), ("centred", "s--")):
      d = spec[spec["kind"] == kind].groupby("index")["eigenvalue"].mean()
      axes[0].semilogy(d.index + 1, np.maximum(d.values, 1e-12), style, label=kind)
    axes[0].set_xlabel("eigenvalue index")
    axes[0].set_ylabel("share of the trace (mean over tasks, seeds)")
    axes[0].legend(fontsize=7)
    if groups is not None and len(groups):
      g = groups.groupby("group")[["share", "share_centred"]].mean()
      y = np.arange(len(g))
      axes[1].barh(y - 0.2, g["share"], 0.4, label="raw")
      axes[1].barh(y + 0.2, g["share_centred"], 0.4, label="centred")
      axes[1].set_yticks(y)
      axes[1].set_yticklabels(g.index, fontsize=7)
      axes[1].set_xlabel("trace share at theta_T")
      axes[1].legend(fontsize=7)
  return _two_panels(path, draw)


def regularisation_and_ema(rows, by_r: dict, findings: list, path: str) -> str:
  """(f): A_T against reg_temp, one line per seed (0 drawn at the smallest positive value / 10)
  (left); the EMA - copy differences with their intervals (right)."""
  def draw(axes):
    if by_r:
      rs = sorted(by_r)
      pos = [r for r in rs if r > 0]
      zero_at = (min(pos) / 10) if pos else 1e-5
      seeds = sorted({s for d in by_r.values() for s in d})
      for s in seeds:
        pts = [(max(r, zero_at), by_r[r][s]["results"]["last_accuracy"]) for r in rs
               if s in by_r[r]]
        axes[0].plot(*zip(*pts), "o-", label=f"seed {s}")
      axes[0].set_xscale("log")
      axes[0].set_xlabel(f"reg_temp (0 drawn at {zero_at:g})")
      axes[0].set_ylabel("A_T (%)")
      axes[0].legend(fontsize=7)
    ema = [f for f in findings if f["quantity"].startswith("EMA")]
    if ema:
      _intervals(axes[1], ema)
      axes[1].set_xlabel("EMA - copy (95% interval over seeds)")
  return _two_panels(path, draw)
