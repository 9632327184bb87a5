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

import functools
import json
import sys

from absl import app

from ntkcl_jax import cli, config_files
from ntkcl_jax.data import summary


def _main(argv, config) -> None:
  del argv
  out = summary.split_summary(config)  # DataError / FileNotFoundError: cli.guard
  print(json.dumps(out, indent=1))


def main(argv=None) -> None:
  """`--config=PATH[:arg]` (default the demo) and its `--config.KEY=VALUE` overrides are loaded
  first (ntkcl_jax.config_files); a bad file, key or value is one `error:` line."""
  try:
    config, _, rest = config_files.from_argv(sys.argv if argv is None else argv)
  except cli.INPUT_ERRORS as e:
    cli.fail(e)
  app.run(cli.guard(functools.partial(_main, config=config)), argv=rest,
          flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()
