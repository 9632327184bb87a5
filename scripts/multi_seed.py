r"""Runs one config over several seeds and writes a markdown table of mean ± std.

    python scripts/multi_seed.py --config=configs/demo.py --workdir=workdirs/demo-seeds \
        [--seeds=0,1,2,3,4] [--config.optim.epochs=1 ...] [--noprogress]

Each seed is an ordinary training run in WORKDIR/seed<s> (`--config.seed=<s>`), one after the
other in this process (scripts/grid.py): a seed whose run is finished (results.json of the same
config) is not rerun, and an interrupted seed resumes from its checkpoints, so the driver itself
can be killed and restarted. Extra `--config.*` arguments go to every run. The table
(WORKDIR/summary.md, also printed) gives each metric per seed and mean ± sample standard deviation
(ddof = 1) over seeds.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as `python scripts/multi_seed.py`: `scripts.*` from the repo root

from ntkcl_jax import cli  # noqa: E402
from scripts import grid  # noqa: E402

DEFAULT_CONFIG = "configs/demo.py"

METRICS = (("avg_incremental_accuracy", "Ā (avg. incremental acc.)"),
           ("last_accuracy", "A_T (last acc.)"),
           ("forgetting", "forgetting (max-based)"),
           ("backward_transfer", "BWT"))


def _topk_average(res: dict):
  tk = res.get("topk_accuracy") or {}
  return tk.get("average") if isinstance(tk, dict) else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def markdown_table(results_by_seed: dict[int, dict], title: str = "") -> str:
  """Markdown table: one row per metric, one column per seed, then mean ± std."""
  seeds = sorted(results_by_seed)
  rows = list(METRICS)
  k = None
  if all(_topk_average(results_by_seed[s]) is not None for s in seeds):
    k = (results_by_seed[seeds[0]].get("topk_accuracy") or {}).get("k")
    rows.append(("__topk__", f"top-{k} Ā"))
  head = "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
  lines = ([f"### {title}", ""] if title else []) + [
      head, "|" + "---|" * (len(seeds) + 2)]
  for key, label in rows:
    vals = [(_topk_average(results_by_seed[s]) if key == "__topk__"
             else results_by_seed[s].get(key)) for s in seeds]
    if any(v is None for v in vals):
      cells, summary = ["n/a" if v is None else f"{v:.2f}" for v in vals], "n/a"
    else:
      m, sd = mean_std(vals)
      cells, summary = [f"{v:.2f}" for v in vals], f"{m:.2f} ± {sd:.2f}"
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=None, help="config file (path.py[:arg])")
  parser.add_argument("--workdir", required=True, help="base directory; seed s runs in seed<s>")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--output", default="", help="markdown file (default WORKDIR/summary.md)")
  args, passthrough = parser.parse_known_args(argv)
  bad = [a for a in passthrough if not a.startswith("--config.") and a not in ("--noprogress",)]
  if bad:
    parser.error(f"unrecognised arguments {bad}; only --config.KEY=VALUE overrides are passed on")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError as e:
    raise cli.InputError(f"--seeds={args.seeds}: expected comma-separated integers") from e
  spec = args.config or os.path.join(REPO, DEFAULT_CONFIG)
  overrides = [a for a in passthrough if a.startswith("--config.")]
  config = grid.load_config(spec, overrides)  # a bad file or override stops before any training
  results = {}
  for seed in seeds:
    workdir = os.path.join(args.workdir, f"seed{seed}")
    run_config = config.copy_and_resolve_references()
    run_config.seed = seed
    command = grid.launch_command(spec, workdir, [*overrides, f"--config.seed={seed}"])
    print(f"seed {seed}: {' '.join(command)}", flush=True)
    results[seed] = grid.train_unless_finished(run_config, workdir,
                                               progress="--noprogress" not in passthrough)
  title = f"{args.config or DEFAULT_CONFIG} over seeds {seeds}"
  table = markdown_table(results, title)
  out = args.output or os.path.join(args.workdir, "summary.md")
  with open(out, "w") as f:
    f.write(table)
  print(table)
  print(f"written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
