r"""Whole tiny runs of the launcher on several device counts and eval batch sizes, and what a user
watches while one runs.

    python -m benchmarks.device_runs                      # 1, 3, 4, 6 fake CPU devices
    python -m benchmarks.device_runs --devices=1,8 --eval_batches=64

Each run is `python -m ntkcl_jax.train --config=configs/tiny.py` in a subprocess with N fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) and `optim.eval_batch_size` B, which
need not divide N: the launcher pads and masks eval batches to the device count (the training
batch, 12, must divide: it does on every count used here). The table gives
each run's last accuracy, whether its whole accuracy matrix equals the 1-device run's, its exit
code and wall time; below it, the progress lines and the step-line speeds of one run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from ntkcl_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # cwd of the subprocesses
TRAIN_BATCH = 12  # the training batch must split over the devices: 12 does on 1, 2, 3, 4 and 6


def one_run(devices: int, eval_batch: int, workdir: str, progress: bool = False) -> dict:
  """One tiny launcher run: its results, stdout lines, stderr tail, exit code and wall time."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "ntkcl_jax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.optim.eval_batch_size={eval_batch}",
         f"--config.optim.batch_size={TRAIN_BATCH}",
         "--config.train.compilation_cache_dir=", "--progress" if progress else "--noprogress"]
  t = time.time()
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  out = {"devices": devices, "eval_batch": eval_batch, "code": p.returncode,
         "seconds": time.time() - t, "stdout": p.stdout.splitlines(),
         "traceback": "Traceback" in p.stderr, "stderr": p.stderr.strip()[-300:]}
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      out["results"] = json.load(f)
  return out


def table(runs: list) -> list:
  base = next((r["results"]["accuracy_matrix"] for r in runs
               if r["devices"] == 1 and "results" in r), None)
  rows = ["| devices | eval batch | exit code | traceback | A_T | matrix equals 1 device | wall s |",
          "|---|---|---|---|---|---|---|"]
  for r in runs:
    res = r.get("results")
    same = "n/a" if res is None or base is None else str(res["accuracy_matrix"] == base)
    a_t = f"{res['last_accuracy']:.2f}" if res else f"error: {r['stderr'][-120:]}"
    rows.append(f"| {r['devices']} | {r['eval_batch']} | {r['code']} | {r['traceback']} | "
                f"{a_t} | {same} | {r['seconds']:.0f} |")
  return rows


def watched(workdir: str) -> list:
  """The progress lines of one run and the speeds its metrics.jsonl step lines carry."""
  r = one_run(1, 16, workdir, progress=True)
  lines = [l for l in r["stdout"] if l.startswith("progress:") or l.startswith("compute:")]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(l) for l in f if '"event": "step"' in l]
  keys = ("step", "lr", "images_per_s", "steps_per_s")
  return (["", "Progress lines of one run (1 device):", ""] + ["    " + l for l in lines] +
          ["", "Its metrics.jsonl step lines (every third):", ""] +
          ["    " + json.dumps({k: s.get(k) for k in keys}) for s in steps[::3]])


def define_flags(fv) -> None:
  flags.DEFINE_list("devices", ["1", "3", "4", "6"], "fake CPU device counts", flag_values=fv)
  flags.DEFINE_list("eval_batches", ["18", "64"], "optim.eval_batch_size values",
                    flag_values=fv)


def _main(fv) -> None:
  try:
    counts = [int(d) for d in fv.devices]
    batches = [int(b) for b in fv.eval_batches]
  except ValueError as e:
    raise cli.InputError(f"--devices / --eval_batches: comma lists of whole numbers ({e})")
  if min(counts + batches) < 1:
    raise cli.InputError("--devices and --eval_batches must be >= 1")
  with tempfile.TemporaryDirectory() as tmp:
    runs = [one_run(d, b, os.path.join(tmp, f"d{d}_b{b}")) for b in batches for d in counts]
    print("\n".join(table(runs) + watched(os.path.join(tmp, "watched"))))


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
