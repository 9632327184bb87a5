r"""Prints a config's class-incremental protocol as JSON before launching it.

COMMAND:
  python -m ntkcl_jax.tools.show_split --config=configs/NAME.py[:args] [--config.seed=S ...]
e.g. a paper benchmark (no data needed for CIFAR-100's counts):
  python -m ntkcl_jax.tools.show_split \
      --config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k

Output: class order (original class ids, in training order), the original classes of each task,
and image counts per task and split (docs/method.md §3.2, 5.2). Counts come from known
per-class counts or from archive/folder listings, so no image is decoded for real benchmarks
(ntkcl_jax/data/summary.py says which source each count came from).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ntkcl_jax import cli, config_files
from ntkcl_jax.data import summary

REPO_ROOT = config_files.REPO_ROOT


def _add_config_root(argv) -> None:
  """Configs import `configs.*`: put the repo holding the config file on sys.path (as
  ntkcl_jax.config_files.load_config_file does) before ml_collections loads it."""
  roots = [REPO_ROOT]
  for a in argv:
    if a.startswith("--config="):
      path = a.split("=", 1)[1].partition(":")[0]
      roots.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
  for r in roots:
    if r not in sys.path:
      sys.path.insert(0, r)


def _main(argv) -> None:
  del argv
  out = summary.split_summary(flags.FLAGS.config)  # DataError / FileNotFoundError: cli.guard
  print(json.dumps(out, indent=1))


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  _add_config_root(argv[1:])
  config_flags.DEFINE_config_file("config", os.path.join(REPO_ROOT, "configs", "demo.py"),
                                  "config file (path.py[:arg])", lock_config=True)
  app.run(cli.guard(_main), argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()
