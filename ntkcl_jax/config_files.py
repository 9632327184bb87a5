"""Config files (`path.py[:arg]`, big_vision style `get_config(arg)`) and `--config.KEY` overrides.

    config = config_files.load_config_file("configs/tiny.py:data=digits")
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections

from ntkcl_jax import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way ml_collections' config_flags does (get_config(arg))."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):  # not found, or a config file since replaced (named)
    raise cli.config_file_error(FileNotFoundError(path), spec)
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if os.path.basename(os.path.dirname(os.path.abspath(path))) == "configs" and root not in sys.path:
    sys.path.insert(0, root)  # config files import their helpers as `configs.*`
  mod_spec = importlib.util.spec_from_file_location("_ntkcl_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every overridable dotted key of a config (leaves and sub-configs)."""
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(config_keys(v, prefix + k + "."))
  return keys


def config_spec(argv: Sequence[str]) -> str:
  """The `--config` argument (`path.py[:arg]`) of a command line, or the default config."""
  spec = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def check_overrides(argv: Sequence[str]) -> None:
  """Rejects `--config.KEY` overrides whose KEY is not in the config, listing the valid keys.

  Runs before absl parses the flags, whose own error for this case is an AttributeError traceback.
  """
  spec = config_spec(argv)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not overrides:
    return
  valid = config_keys(load_config_file(spec))
  bad = [k for k in overrides if k not in valid]
  if bad:
    lines = [f"unknown config key(s) {bad} for {spec}."]
    for k in bad:
      close = difflib.get_close_matches(k, valid, n=3)
      if close:
        lines.append(f"  {k}: did you mean {', '.join(close)}?")
    lines.append("valid keys:\n  " + "\n  ".join(valid))
    raise cli.InputError("\n".join(lines))
