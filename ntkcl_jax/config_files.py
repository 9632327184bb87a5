"""Config files (`path.py[:arg]`, big_vision style `get_config(arg)`) and `--config.KEY` overrides.

    config = config_files.load_config_file("configs/tiny.py:data=digits")

The repository's configs/ is the package `ntkcl_jax.configs` (setup.py's package_dir): config files
import each other as `ntkcl_jax.configs.*`, and a `configs/NAME.py` path that does not exist from
the working directory is looked up in that package, so an installed package finds its configs.
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


def _configs_package_dir() -> str:
  """The directory of `ntkcl_jax.configs`: the checkout's configs/ (editable install) or the
  installed package's ntkcl_jax/configs. A checkout that is only on sys.path (not installed) lacks
  setup.py's package_dir mapping: configs/ is registered under that name here."""
  spec = importlib.util.find_spec("ntkcl_jax.configs")
  if spec is not None:
    return list(spec.submodule_search_locations)[0]
  path = os.path.join(REPO_ROOT, "configs")
  init = os.path.join(path, "__init__.py")
  if os.path.isfile(init):
    spec = importlib.util.spec_from_file_location("ntkcl_jax.configs", init,
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ntkcl_jax.configs"] = module
    spec.loader.exec_module(module)
  return path


CONFIG_DIR = _configs_package_dir()
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "demo.py")

# Config keys that no longer exist -> why, and what to do instead (reported in one line).
REMOVED_KEYS = {
    "train.mesh_model": "the mesh is data-parallel only (the frozen backbone and the small "
                        "trainable state are replicated on every device, docs/design.md Devices); "
                        "drop it, train.mesh_data sets the number of devices",
}


def removed_key_error(key: str) -> cli.InputError:
  return cli.InputError(f"config key {key} was removed: {REMOVED_KEYS[key]}")


def check_removed_keys(config: ml_collections.ConfigDict) -> None:
  """Rejects a config (e.g. from a config file) that still sets a removed key."""
  for key in REMOVED_KEYS:
    node = config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        break
      node = node[part]
    else:
      raise removed_key_error(key)


def resolve_path(path: str) -> str:
  """`path` if it is a file; else a relative `configs/NAME.py` or `ntkcl_jax/configs/NAME.py` that
  names a shipped config resolves to that file in the package; else `path` unchanged."""
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  parts = os.path.normpath(path).split(os.sep)
  for prefix in (["configs"], ["ntkcl_jax", "configs"]):
    if parts[:len(prefix)] == prefix and len(parts) > len(prefix):
      candidate = os.path.join(CONFIG_DIR, *parts[len(prefix):])
      if os.path.isfile(candidate):
        return candidate
  return path


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
  """argv with its `--config=PATH[:arg]` resolved by resolve_path, so that ml_collections'
  config_flags, which opens the path as given, finds a shipped config from any directory."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      path, sep, arg = a.split("=", 1)[1].partition(":")
      out[i] = f"--config={resolve_path(path)}{sep}{arg}"
    elif a == "--config" and i + 1 < len(out):
      path, sep, arg = out[i + 1].partition(":")
      out[i + 1] = f"{resolve_path(path)}{sep}{arg}"
  return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way ml_collections' config_flags does (get_config(arg)); a shipped
  config is found from any directory (resolve_path)."""
  path, _, arg = spec.partition(":")
  path = resolve_path(path)
  if not os.path.isfile(path):  # not found, or a config file since replaced (named)
    raise cli.config_file_error(FileNotFoundError(path), spec)
  config_dir = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(config_dir)
  if (os.path.basename(config_dir) == "configs" and config_dir != os.path.abspath(CONFIG_DIR)
      and root not in sys.path):
    sys.path.insert(0, root)  # a configs/ of one's own may import its helpers as `configs.*`
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
  for k in overrides:
    if k in REMOVED_KEYS:
      raise removed_key_error(k)
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
