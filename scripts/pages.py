"""What the evidence pages share: the runs behind them and the way they print a comparison.

A cell is one ordinary training run: a dataset's config at the pages' scale, a method's config
overrides, a seed, in BASE/<dataset>/<method>/seed<s>. It is trained unless its run is finished
(scripts/grid.py), so a page is built over as many interruptions as it takes by rerunning its
command.
Every cell draws its image subsample with its own seed (`data.subsample_per_seed`), so an
interval over seeds covers the choice of images as well as class order and initialisation.

A comparison is a paired per-seed difference with its Student-t 95% interval, verdict and the
bootstrap interval beside it (ntkcl_jax/evidence.py); the forest plot draws each one.
"""
from __future__ import annotations

import datetime
import io
import os
from typing import Callable, Optional, Sequence

from absl import flags
import numpy as np

from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import evidence
from ntkcl_jax import paths
from ntkcl_jax import results
from ntkcl_jax import switches
from scripts import grid

REPO = grid.REPO
# The switches that can change a run of the pages' splits (5 tasks x 2 classes: init_cls ==
# increment, so fix_old_pool is left out).
FIXES = switches.affecting(init_cls=2, increment=2)
NTKCL = ["--config.method.name=ntkcl", "--config.method.variant=official"]

# name -> (label, config overrides)
METHODS = {
    "official": ("NTK-CL faithful (official numerics)", NTKCL),
    "official_bf16": ("NTK-CL faithful, bfloat16 compute", NTKCL + ["--config.model.dtype=bfloat16"]),
    # the frozen backbone's own feature as a third section, weight 1.0 (official use_init_ptm)
    "official_ptm": ("NTK-CL faithful with the init-PTM section",
                     NTKCL + ["--config.method.use_init_ptm=True",
                              "--config.method.section_weights=(1.0,0.3,0.1)"]),
    "corrected": ("NTK-CL corrected (all six switches)",
                  ["--config.method.name=ntkcl", "--config.method.variant=corrected"]
                  + [f"--config.method.{f}=True" for f in FIXES]),
    **{f: (f"NTK-CL corrected, only {f}",
           ["--config.method.name=ntkcl", "--config.method.variant=corrected",
            f"--config.method.{f}=True"]) for f in FIXES},
    "channel": ("channel branch only", ["--config.method.name=channel"]),
    "patch": ("patch branch only", ["--config.method.name=patch"]),
    "simplecil": ("SimpleCIL (frozen-backbone prototypes)", ["--config.method.name=simplecil"]),
    "seq_adapter": ("sequential adapter fine-tuning", ["--config.method.name=seq_adapter"]),
}
# Pairs of switches, the corrections page's second stage: the suspects of the corrected collapse.
for _a, _b in (("fix_nce_sign", "fix_orth"), ("fix_nce_sign", "fix_patch_init"),
               ("fix_nce_sign", "fix_fusion"), ("fix_orth", "fix_patch_init"),
               ("fix_orth", "fix_fusion")):
  METHODS[f"{_a}+{_b}"] = (f"NTK-CL corrected, {_a} and {_b}",
                           ["--config.method.name=ntkcl", "--config.method.variant=corrected",
                            f"--config.method.{_a}=True", f"--config.method.{_b}=True"])
TRAINS = {m for m in METHODS if m != "simplecil"}  # methods whose runs train (oracle recorded)
# The results page's methods of each dataset; the init-PTM arm on Split-Imagenette only.
RESULTS_METHODS = {"imagenette": ("official", "official_bf16", "official_ptm", "corrected",
                                  "channel", "simplecil"),
                   "cifar10": ("official", "official_bf16", "corrected", "channel", "simplecil")}

DATASETS = {"imagenette": "configs/imagenette_dinov2s.py", "cifar10": "configs/cifar10_dinov2s.py"}
DATASET_NAMES = {"imagenette": "Split-Imagenette", "cifar10": "Split-CIFAR-10"}
# 200 training images per class drawn per seed, 2 classes per task, batch 8, 2 epochs: 100 SGD
# steps per task; 200 test images per class drawn per seed. docs/scale.md: why this scale.
DEFAULT_SCALE = "size=56,per_class=200,test_per_class=200,epochs=2,batch=8"
DEFAULT_SEEDS = "0,1,2,3,4"
# Every run of the pages: the subsample is drawn with the run's seed.
COMMON = ["--config.data.subsample_per_seed=True"]

# What each metric's difference should be if the first method is better; F is forgetting.
METRICS = (("avg_incremental_accuracy", "ΔĀ", ">0"), ("last_accuracy", "ΔA_T", ">0"),
           ("forgetting", "ΔF", "<0"))
REQUIRED = ("avg_incremental_accuracy", "last_accuracy", "forgetting", "wall_time_s",
            "accuracy_matrix", "old_new_accuracy")


def overrides(method: str, seed, extra: Sequence[str] = ()) -> list:
  return [f"--config.seed={seed}", *COMMON, *METHODS[method][1], *extra]


def cell(dataset: str, method: str, seed, scale: str, base: str, extra: Sequence[str] = ()):
  """(config, workdir) of one cell; `extra`: overrides every cell of a page adds."""
  workdir = os.path.join(base, dataset, method, f"seed{seed}")
  config = config_files.load(f"{DATASETS[dataset]}:{scale}", overrides(method, seed, extra))
  return config, workdir


def command(dataset: str, method: str, seed, scale: str, workdir: str,
            extra: Sequence[str] = ()) -> list[str]:
  """The launcher command of one cell (from the repository root); the pages list these."""
  cmd = overrides(method, seed, extra)
  return grid.launch_command(f"{DATASETS[dataset]}:{scale}", workdir,
                             [cmd[0], "--noprogress", *cmd[1:]])


def _checked(res: dict, workdir: str) -> dict:
  missing = [k for k in REQUIRED if k not in res]
  if missing:
    raise cli.InputError(f"{workdir}/results.json lacks {missing}: not a results.json written by "
                         f"ntkcl_jax.train; delete it (or its run directory) to rerun that cell")
  return res


def _current(res: Optional[dict], method: str) -> bool:
  """A finished record the pages can use: trained methods carry the oracle-prototype result."""
  return res is not None and (method not in TRAINS or "oracle_prototypes" in res)


def run_cell(dataset, method, seed, scale, base, extra=(), log: Callable = print) -> dict:
  """The results of one cell, trained unless its run is finished. A finished record of a trained
  method without the oracle-prototype diagnostic is retrained (run checkpoints are not kept)."""
  config, workdir = cell(dataset, method, seed, scale, base, extra)
  res = grid.finished_results(config, workdir)
  if res is not None and not _current(res, method):
    log(f"{workdir}: the record has no oracle-prototype result; retraining it")
    os.remove(os.path.join(workdir, "results.json"))
  return _checked(grid.train_unless_finished(config, workdir, progress=False, log=log), workdir)


def finished_cell(dataset, method, seed, scale, base, extra=()) -> Optional[dict]:
  """The results of one cell if its run is finished, else None (nothing is trained)."""
  config, workdir = cell(dataset, method, seed, scale, base, extra)
  res = grid.finished_results(config, workdir)
  return _checked(res, workdir) if _current(res, method) else None


def collect(datasets: Sequence[str], methods_of: Callable[[str], Sequence[str]], seeds,
            scale: str, base: str, finished_only: bool, extra=(), log: Callable = print) -> dict:
  """{dataset: {method: {seed: results}}}, seed-major (a run of the page that stops early leaves whole
  seeds of every method); finished_only: nothing is trained."""
  out = {}
  for dataset in datasets:
    out[dataset] = {m: {} for m in methods_of(dataset)}
    for seed in seeds:
      for m in methods_of(dataset):
        res = (finished_cell(dataset, m, seed, scale, base, extra) if finished_only
               else run_cell(dataset, m, seed, scale, base, extra, log=log))
        if res is not None:
          out[dataset][m][seed] = res
  return out


# -- reading records ---------------------------------------------------------------------------
def matrix(res: dict) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row] for row in res["accuracy_matrix"]],
                  np.float64)


def values(by_seed: dict, fn: Callable[[dict], Optional[float]]) -> dict:
  """{seed: fn(results)} with None where fn has no value."""
  return {s: fn(r) for s, r in by_seed.items()}


def key(name: str) -> Callable[[dict], Optional[float]]:
  return lambda r: r.get(name)


# -- printing ---------------------------------------------------------------------------------
def mean_sd(vals) -> str:
  v = np.asarray([x for x in vals if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return "n/a"
  return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def paired_text(iv: evidence.Interval, prediction: Optional[str], margin: float = 0.0) -> str:
  """'+1.23 [+0.41, +2.05] (n=5); **holds**; bootstrap [...]', or 'n/a' without common seeds."""
  if iv.n == 0:
    return "n/a"
  return evidence.describe(iv, prediction, margin)


def header(title: str, script: str) -> list:
  return [f"# {title} (regenerated by `python {script}`)", "",
          f"Made on {os.cpu_count()} CPU cores ({results.cpu()}), "
          f"{datetime.date.today().isoformat()}."]


STATISTICS = [
    "Every comparison is the mean over seeds of a per-seed difference (same seed = same class",
    "order, image subsample and initialisation), with its Student-t 95% interval (n − 1 degrees",
    "of freedom) and n, and a verdict read off that interval: **holds** (the interval lies on the",
    "predicted side, beyond the margin where one is stated), **fails** (it lies on the other side)",
    "or **inconclusive**; \"within noise\" marks an interval that contains 0. The percentile",
    "bootstrap interval is printed beside it for reference only: at n = 5 it covers about 83% of",
    "the time, not 95%, so no verdict is read from it."]


def compute_plan(results: dict, seeds) -> list:
  """Wall time of a page's finished runs and an estimate for the missing ones (mean of the
  method's finished runs, else of all runs). results[dataset][method] = {seed: results.json}."""
  walls = {(d, m): [r["wall_time_s"] for r in by_seed.values()]
           for d, by_method in results.items() for m, by_seed in by_method.items()}
  every = [w for ws in walls.values() for w in ws]
  mean_all = float(np.mean(every)) if every else 600.0
  done = sum(every)
  missing = sum((len(seeds) - len(ws)) * (float(np.mean(ws)) if ws else mean_all)
                for ws in walls.values())
  text = (f"Runs finished: {len(every)} of {len(walls) * len(seeds)}, {done / 3600:.1f} h of "
          f"compute in all (one run at a time on the 2 cores; wall times as each run recorded "
          f"them).")
  if missing:
    text += (f" Missing runs: about {missing / 3600:.1f} h more at the same rates; rerunning "
             f"this page's command trains them.")
  return [text]


def forest_plot(rows: Sequence[tuple], path: str, title: str = "") -> str:
  """Each paired difference as a point with its t interval, zero marked. rows: (panel, label,
  Interval, colour key); one panel per distinct panel name, labels top to bottom."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = list(dict.fromkeys(r[0] for r in rows))
  labels = list(dict.fromkeys(r[1] for r in rows))
  colours = {k: c for k, c in zip(dict.fromkeys(r[3] for r in rows),
                                  ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.42 * len(labels) + 1.6),
                           sharey=True, squeeze=False)
  for ax, panel in zip(axes[0], panels):
    ax.axvline(0.0, color="black", lw=0.8)
    for _, label, iv, kind in (r for r in rows if r[0] == panel):
      if not iv.defined:
        continue
      y = len(labels) - 1 - labels.index(label)
      ax.errorbar(iv.estimate, y, xerr=[[iv.estimate - iv.lo], [iv.hi - iv.estimate]], fmt="o",
                  color=colours[kind], capsize=3, ms=4)
    ax.set_title(panel)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.grid(axis="x", alpha=0.3)
  handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in colours.items()]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  paths.write_bytes_atomic(path, buf.getvalue())
  return path


def check_output(output: str, workdir: str) -> None:
  """Before hours of runs: the page's folder exists and the run folder is not a file."""
  if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise cli.InputError(f"--output={output}: directory {os.path.dirname(output)} does not exist")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise cli.InputError(f"--workdir={workdir} is a file, not a directory of runs")


def parse_seeds(items: Sequence[str]) -> list:
  try:
    return [int(s) for s in items]
  except ValueError as e:
    raise cli.InputError(f"--seeds={','.join(items)}: expected comma-separated integers") from e


def define_flags(fv, runs: str, page_name: str) -> None:
  """The flags every page has: seeds, scale, run folder (runs/<runs>), --finished_only and the
  page (docs/<page_name>)."""
  flags.DEFINE_list("seeds", DEFAULT_SEEDS.split(","), "seeds of every cell", flag_values=fv)
  flags.DEFINE_string("scale", DEFAULT_SCALE, "config args of the datasets' configs (image "
                      "size, images per class, epochs, batch)", flag_values=fv)
  flags.DEFINE_string("workdir", os.path.join(REPO, "runs", runs), "folder of the runs",
                      flag_values=fv)
  flags.DEFINE_bool("finished_only", False, "train nothing: build the page from the runs "
                    "already finished", flag_values=fv)
  flags.DEFINE_string("output", os.path.join(REPO, "docs", page_name), "the page",
                      flag_values=fv)


def regenerate(module: str, fv) -> str:
  """The command that rebuilds the page as this run of `module` did (flags not at their
  defaults but --finished_only, so that it trains what is missing; paths relative to the
  repository)."""
  parts = [f"python -m {module}"]
  for name in fv:
    flag = fv[name]
    if flag.value == flag.default or name == "finished_only":
      continue
    value = ",".join(flag.value) if isinstance(flag.value, list) else flag.value
    if name in ("workdir", "output"):
      value = os.path.relpath(value, REPO)
    parts.append(f"--{name}={value}")
  return " ".join(parts)


def beside(output: str, relative: str) -> str:
  """The absolute path of a figure next to the page (`relative` to its folder), folder made."""
  path = os.path.join(os.path.dirname(os.path.abspath(output)), relative)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


def write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)
  print(text)


def check_names(names: Sequence[str], known, flag: str) -> None:
  unknown = [n for n in names if n not in known]
  if unknown:
    raise cli.InputError(f"unknown {flag} {unknown} (--{flag}); known {sorted(known)}")
