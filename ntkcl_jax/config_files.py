"""Config files (`path.py[:arg]`, big_vision style `get_config(arg)`) and `--config.KEY=VALUE`
overrides: the one loader of the launcher, the tools, the scripts and the benchmarks.

    config = config_files.load("configs/tiny.py:data=digits", ["--config.seed=1"])
    config, spec, rest = config_files.from_argv(sys.argv, default="configs/demo.py")

The shipped configs are the package `ntkcl_jax.configs` (ntkcl_jax/configs/); `configs/NAME.py`
names one of them from any working directory (and so does `ntkcl_jax/configs/NAME.py`). A config
file of one's own is any path; it imports the shipped helpers as `ntkcl_jax.configs.*`.
Overrides are parsed by ml_collections as the launcher always parsed them (each value by its
field's type); an unknown key, a removed key, a bad value, a missing file or a config file that
raises is a cli.InputError of one line.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import traceback
from typing import Iterator, Optional, Sequence

from absl import flags as absl_flags
import ml_collections
from ml_collections import config_flags

from ntkcl_jax import cli
from ntkcl_jax import configs as shipped
from ntkcl_jax.configs import ntkcl_benchmarks

CONFIG_DIR = os.path.dirname(os.path.abspath(shipped.__file__))
DEFAULT_CONFIG = "configs/demo.py"

# Config keys that no longer exist -> why, and what to do instead (reported in one line).
REMOVED_KEYS = {
    "train.mesh_model": "the mesh is data-parallel only (the frozen backbone and the small "
                        "trainable state are replicated on every device, docs/design.md Devices); "
                        "drop it, train.mesh_data sets the number of devices",
}
# The per-benchmark files `configs/<benchmark>_<backbone>.py` that configs/ntkcl_benchmarks.py
# replaced: its config args `benchmark=` and `backbone=` select the same configs.
REPLACED_BENCHMARKS = tuple(ntkcl_benchmarks.BENCHMARKS)
REPLACED_BACKBONES = tuple(ntkcl_benchmarks.CHECKPOINTS)


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


def replaced_config_hint(spec: str) -> Optional[str]:
  """For a missing `configs/<benchmark>_<backbone>.py[:arg]`, the one-line message naming the
  configs/ntkcl_benchmarks.py command that replaced it (its arg kept); None for any other path."""
  path, _, arg = spec.partition(":")
  name = os.path.basename(path)
  stem, _, backbone = name[:-3].rpartition("_") if name.endswith(".py") else ("", "", "")
  if os.path.isfile(path) or stem not in REPLACED_BENCHMARKS or backbone not in REPLACED_BACKBONES:
    return None
  new = os.path.join(os.path.dirname(path), "ntkcl_benchmarks.py")
  args = f"benchmark={stem},backbone={backbone}" + (f",{arg}" if arg else "")
  return (f"{path} was replaced by {new}:{args} (config args: ckpt=..., data_dir=..., "
          f"variant=official|corrected)")


def _chain(e: Optional[BaseException]) -> Iterator[BaseException]:
  """e, then what it was raised from or during, down to the original exception."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _where(e: BaseException) -> str:
  """' (at file:line)' of the line that raised e, relative to the working directory if below it."""
  if isinstance(e, SyntaxError) and e.filename:
    filename, line = e.filename, e.lineno
  else:
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
      return ""
    filename, line = tb[-1].filename, tb[-1].lineno
  rel = os.path.relpath(filename)
  return f" (at {filename if rel.startswith('..') else rel}:{line})"


def config_file_error(e: BaseException, spec: str, flag: str = "config") -> cli.InputError:
  """The InputError for a config file `path.py[:arg]` that is missing or whose code raised e
  (the root of e's chain): a config file is user input, so its failure is explained, not traced."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    hint = replaced_config_hint(spec)
    if hint:
      return cli.InputError(hint)
    return cli.InputError(f"config file not found: {path!r} (--{flag}); the project's config "
                          f"files are in {CONFIG_DIR} (`configs/NAME.py` names one of them)")
  root = list(_chain(e))[-1]
  return cli.InputError(f"config file {spec!r} (--{flag}) raised {type(root).__name__}: "
                        f"{cli.message(root)}{_where(root)}; fix the file or its argument")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `path.py[:arg]` (a shipped config from any directory),
  without overrides; a missing file or one that raises is a cli.InputError."""
  path, _, arg = spec.partition(":")
  path = resolve_path(path)
  if not os.path.isfile(path):
    raise config_file_error(FileNotFoundError(path), spec)
  try:
    mod_spec = importlib.util.spec_from_file_location("_ntkcl_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # the config file's own code
    raise config_file_error(e, f"{path}:{arg}" if arg else path) from e


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every overridable dotted key of a config (leaves and sub-configs)."""
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(config_keys(v, prefix + k + "."))
  return keys


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


def _check_keys(config: ml_collections.ConfigDict, spec: str, overrides: Sequence[str]) -> None:
  """Refuses removed keys and unknown keys (listing the valid ones, closest first)."""
  keys = [o[len("--config."):].split("=", 1)[0] for o in overrides]
  for k in keys:
    if k in REMOVED_KEYS:
      raise removed_key_error(k)
  valid = config_keys(config)
  bad = [k for k in keys if k not in valid]
  if bad:
    lines = [f"unknown config key(s) {bad} for {spec}."]
    for k in bad:
      close = difflib.get_close_matches(k, valid, n=3)
      if close:
        lines.append(f"  {k}: did you mean {', '.join(close)}?")
    lines.append("valid keys:\n  " + "\n  ".join(valid))
    raise cli.InputError("\n".join(lines))


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of `path.py[:arg]` with `--config.KEY=VALUE` overrides applied (each value parsed
  by its field's type, as ml_collections' config flags do), locked against new keys."""
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise cli.InputError(f"{bad} are not --config.KEY=VALUE overrides")
  config = load_config_file(spec)
  check_removed_keys(config)
  _check_keys(config, spec, overrides)
  flag_values = absl_flags.FlagValues()  # private: never clashes with a program's own flags
  argv = ["load", *overrides]
  config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)  # the overrides it registers come from argv
  try:
    flag_values(argv)
  except absl_flags.Error as e:
    raise cli.InputError(f"{cli.message(e)} (config {spec})") from e
  return flag_values.config


def split_argv(argv: Sequence[str], default: str = DEFAULT_CONFIG):
  """(config spec, its overrides, the rest of argv) of a command line: `--config=SPEC` or
  `--config SPEC` and every `--config.KEY=VALUE` are taken out; argv[0] stays in the rest."""
  spec, overrides, rest = default, [], []
  args = list(argv)
  i = 0
  while i < len(args):
    a = args[i]
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      spec = args[i + 1]
      i += 1
    elif a.startswith("--config."):
      overrides.append(a)
    else:
      rest.append(a)
    i += 1
  return spec, overrides, rest


def from_argv(argv: Sequence[str], default: str = DEFAULT_CONFIG):
  """(config, spec, rest of argv): the command line's config loaded with its overrides (`load`),
  and the arguments left for the program's own flags."""
  spec, overrides, rest = split_argv(argv, default)
  return load(spec, overrides), spec, rest


def take_config(default: str = DEFAULT_CONFIG):
  """A `take` for cli.run_program: loads the command line's `--config=SPEC` and its overrides
  (from_argv) and hands the program `config`, `config_spec` and `config_overrides`."""
  def take(argv: Sequence[str]):
    spec, overrides, rest = split_argv(argv, default)
    return {"config": load(spec, overrides), "config_spec": spec,
            "config_overrides": overrides}, rest
  return take
