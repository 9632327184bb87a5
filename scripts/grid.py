"""Train this config into this workdir unless it is finished: the one helper of every grid driver.

A run is a config and a workdir. It is finished when WORKDIR/results.json exists and holds the
same config (the `train.*` bookkeeping section aside: logging, checkpoint cadence, kernel
recording); its results are then read back. Otherwise it trains, or resumes from its checkpoints,
with `ntkcl_jax.train.run`, so a driver that is killed picks up where it stopped when rerun.

    config = grid.load_config("configs/tiny.py:data=digits", ["--config.seed=1"])
    results = grid.train_unless_finished(config, "workdirs/x/seed1")
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

from absl import flags as absl_flags
import ml_collections
from ml_collections import config_flags

from ntkcl_jax.configs import base
from ntkcl_jax import cli
from ntkcl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of a config file `path.py[:arg]` with `--config.KEY=VALUE` overrides, parsed as
  the launcher parses its flags (same types, unknown keys refused); a bad file, arg, key or value
  is a cli.InputError."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    raise cli.config_file_error(FileNotFoundError(path), spec)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise cli.InputError(f"{bad} are not --config.KEY=VALUE overrides")
  config_dir = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(config_dir)
  if os.path.basename(config_dir) == "configs" and root not in sys.path:
    sys.path.insert(0, root)  # config files import their helpers as `configs.*`
  argv = ["load_config", f"--config={spec}", *overrides]
  flag_values = absl_flags.FlagValues()  # private: never clashes with a program's own flags
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    err = cli.flag_parse_error(e)
    if err is None and isinstance(e, absl_flags.Error):
      err = cli.InputError(cli.message(e))
    if err is None:
      raise
    raise err from e
  value = flag_values["config"].value
  if type(value).__name__ == "_ErrorConfig":  # config_flags defers a load error to first use
    error = object.__getattribute__(value, "_error")
    raise cli.flag_parse_error(error) or cli.config_file_error(error, spec) from error
  return value


def comparable(cfg_json: dict) -> dict:
  """The parts of a saved config that name the run: all but `train.*` (bookkeeping)."""
  return {k: v for k, v in cfg_json.items() if k != "train"}


def _flat(tree: dict, prefix: str = "") -> dict:
  """{'section.key': leaf}; an empty dict names nothing and leaves no key (else a default
  `model.overrides: {}` would count as a difference beside a saved `model.overrides.patch_size`)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def with_schema_defaults(saved: dict) -> dict:
  """A saved config completed with the current schema's defaults (configs/base.py) for keys
  added since it was written: a key added at its default names the same run as before."""
  defaults = _flat(comparable(json.loads(base.get_config().to_json_best_effort())))
  have = _flat(comparable(saved))
  return {**{k: v for k, v in defaults.items() if k not in have}, **have}


def read_json(path: str, what: str, remedy: str):
  """The JSON document at `path`; where it is not JSON, a cli.InputError saying that `path` is
  not `what` and what to do (`remedy`)."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise cli.InputError(f"{path} is not {what} ({e}); {remedy}") from e


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list:
  """The flat keys (`section.key`) where a saved run's config differs from `config`; keys added
  since the run was saved count at their defaults (with_schema_defaults)."""
  want = _flat(comparable(json.loads(config.to_json_best_effort())))
  have = with_schema_defaults(saved)
  return sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))


def finished_results(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  """The results of the finished run of `config` in `workdir`, or None when there is none yet.

  A results.json that is not one, or that another config wrote, is a cli.InputError: training
  there would overwrite (or refuse to resume) a finished run."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  what, remedy = ("a results.json written by ntkcl_jax.train",
                  "delete it (or its run directory) to rerun that run")
  results = read_json(path, what, remedy)
  if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
    raise cli.InputError(f"{path} has no config: not {what}; {remedy}")
  differ = config_differences(results["config"], config)
  if differ:
    sections = sorted({k.split(".")[0] for k in differ})
    raise cli.InputError(f"{workdir} holds a finished run of another config (sections {sections} "
                         f"differ); give this run another workdir, or delete that one to retrain")
  return results


def train_unless_finished(config: ml_collections.ConfigDict, workdir: str, *,
                          progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """The results dict of `config` run in `workdir`: read back when the run is finished, else
  trained (or resumed from its checkpoints) with ntkcl_jax.train.run."""
  results = finished_results(config, workdir)
  if results is not None:
    return results
  log(f"training {workdir}")
  return train.run(config, workdir, progress=progress)


def launch_command(spec: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
  """The launcher command line that trains the same run (`python -m ntkcl_jax.train ...`)."""
  return ["python", "-m", "ntkcl_jax.train", f"--config={spec}", f"--workdir={workdir}",
          *overrides]
