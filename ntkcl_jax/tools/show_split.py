r"""Prints a config's class-incremental protocol as JSON before launching it.

COMMAND:
  python -m ntkcl_jax.tools.show_split --config=configs/NAME.py[:args] [--config.seed=S ...]

Output: class order (original class ids, in training order), the original classes of each task,
and image counts per task and split (shared spec method.md 3.2, 5.2). Counts come from known
per-class counts or from archive/folder listings, so no image is decoded for real benchmarks
(ntkcl_jax/data/summary.py says which source each count came from).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _add_config_root(argv) -> None:
  """Configs import `configs.*`: put the repo holding the config file on sys.path (as
  ntkcl_jax.train.load_config_file does) before ml_collections loads it."""
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
  from ntkcl_jax.data import summary  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  try:
    out = summary.split_summary(config)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(json.dumps(out, indent=1))


def main(argv=None) -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  _add_config_root(argv[1:])
  config_flags.DEFINE_config_file("config", os.path.join(REPO_ROOT, "configs", "demo.py"),
                                  "config file (path.py[:arg])", lock_config=True)
  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()
