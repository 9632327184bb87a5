r"""Runs one config over several seeds and writes a markdown table of mean ± std.

    python -m scripts.multi_seed --config=configs/demo.py --workdir=workdirs/demo-seeds \
        [--seeds=0,1,2,3,4] [--config.optim.epochs=1 ...] [--noprogress]

Each seed is an ordinary training run in WORKDIR/seed<s> (`--config.seed=<s>`), one after the
other in this process (scripts/grid.py): a seed whose run is finished (results.json of the same
config) is not rerun, and an interrupted seed resumes from its checkpoints, so the driver itself
can be killed and restarted. Extra `--config.*` arguments go to every run. The table
(WORKDIR/summary.md, also printed) gives each metric per seed and mean ± sample standard deviation
(ddof = 1) over seeds.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
import numpy as np

from ntkcl_jax import cli
from ntkcl_jax import config_files
from scripts import grid

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


def define_flags(fv) -> None:
  flags.DEFINE_string("workdir", None, "base directory; seed s runs in seed<s>", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds", flag_values=fv)
  flags.DEFINE_string("output", "", "markdown file (default WORKDIR/summary.md)", flag_values=fv)
  flags.DEFINE_bool("progress", True, "progress bars of the runs", flag_values=fv)


def _main(fv, config, config_spec, config_overrides) -> int:
  try:
    seeds = [int(s) for s in fv.seeds if s.strip()]
  except ValueError as e:
    raise cli.InputError(f"--seeds={','.join(fv.seeds)}: expected comma-separated integers") from e
  results = {}
  for seed in seeds:
    workdir = os.path.join(fv.workdir, f"seed{seed}")
    run_config = config.copy_and_resolve_references()
    run_config.seed = seed
    command = grid.launch_command(config_spec, workdir, [*config_overrides, f"--config.seed={seed}"])
    print(f"seed {seed}: {' '.join(command)}", flush=True)
    results[seed] = grid.train_unless_finished(run_config, workdir, progress=fv.progress)
  table = markdown_table(results, f"{config_spec} over seeds {seeds}")
  out = fv.output or os.path.join(fv.workdir, "summary.md")
  with open(out, "w") as f:
    f.write(table)
  print(table)
  print(f"written to {out}")
  return 0


main = cli.program(_main, define_flags, __doc__, take=config_files.take_config())


if __name__ == "__main__":
  sys.exit(main())
