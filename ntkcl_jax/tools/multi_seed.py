r"""Runs one config over several seeds and writes a markdown table of mean ± std.

    python -m ntkcl_jax.tools.multi_seed --config=configs/demo.py --workdir=workdirs/demo-seeds \
        [--seeds=0,1,2,3,4] [--config.optim.epochs=1 ...]

Each seed is an ordinary launcher run in WORKDIR/seed<s> (`--config.seed=<s>`), started as its own
process, one after the other; a seed whose results.json exists is not rerun, and an interrupted
seed resumes from its checkpoints, so the driver itself can be killed and restarted. Extra
`--config.*` arguments go to every run. The table (WORKDIR/summary.md, also printed) gives each
metric per seed and mean ± sample standard deviation (ddof = 1) over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Sequence

import numpy as np

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
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=None, help="config file (path.py[:arg])")
  parser.add_argument("--workdir", required=True, help="base directory; seed s runs in seed<s>")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--output", default="", help="markdown file (default WORKDIR/summary.md)")
  args, passthrough = parser.parse_known_args(argv)
  bad = [a for a in passthrough if not a.startswith("--config.") and a not in ("--noprogress",)]
  if bad:
    parser.error(f"unrecognised arguments {bad}; only --config.KEY=VALUE overrides are passed on")
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  results = {}
  for seed in seeds:
    workdir = os.path.join(args.workdir, f"seed{seed}")
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      cmd = [sys.executable, "-m", "ntkcl_jax.train", f"--workdir={workdir}",
             f"--config.seed={seed}", *passthrough]
      if args.config:
        cmd.insert(3, f"--config={args.config}")
      print(f"seed {seed}: {' '.join(cmd)}", flush=True)
      code = subprocess.call(cmd)
      if code != 0:
        print(f"seed {seed} failed with exit code {code}; fix it and rerun this command (finished "
              f"seeds are kept, the failed one resumes from its checkpoints)", file=sys.stderr)
        return code
    with open(path) as f:
      results[seed] = json.load(f)
  title = f"{args.config or 'configs/demo.py'} over seeds {seeds}"
  table = markdown_table(results, title)
  out = args.output or os.path.join(args.workdir, "summary.md")
  with open(out, "w") as f:
    f.write(table)
  print(table)
  print(f"written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
