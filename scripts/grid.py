"""Train this config into this workdir unless it is finished: the one helper of every grid driver.

A run is a config and a workdir. It is finished when WORKDIR/results.json exists and holds the
same run (ntkcl_jax/same_run.py, the rule the launcher resumes by); its results are then read
back. Otherwise it trains, or resumes from its checkpoints,
with `ntkcl_jax.train.run`, so a driver that is killed picks up where it stopped when rerun.

    config = config_files.load("configs/tiny.py:data=digits", ["--config.seed=1"])
    results = grid.train_unless_finished(config, "workdirs/x/seed1")
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import ml_collections

from ntkcl_jax import cli
from ntkcl_jax import results
from ntkcl_jax import same_run
from ntkcl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finished_results(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  """The results of the finished run of `config` in `workdir`, or None when there is none yet.

  A results.json that is not one, or that another run wrote (ntkcl_jax/same_run.py: the rule the
  launcher resumes by), is a cli.InputError: training there would overwrite a finished run."""
  res = results.read(workdir)
  if res is None:
    return None
  diffs = same_run.differences(res["config"], config)
  if diffs:
    raise cli.InputError(f"{workdir} holds a finished run of another config "
                         f"({same_run.describe(diffs)}); give this run another workdir, or "
                         f"delete that one to retrain")
  return res


def train_unless_finished(config: ml_collections.ConfigDict, workdir: str, *,
                          progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """The results dict of `config` run in `workdir`: read back when the run is finished, else
  trained (or resumed from its checkpoints) with ntkcl_jax.train.run."""
  res = finished_results(config, workdir)
  if res is not None:
    return res
  log(f"training {workdir}")
  return train.run(config, workdir, progress=progress)


def launch_command(spec: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
  """The launcher command line that trains the same run (`python -m ntkcl_jax.train ...`)."""
  return ["python", "-m", "ntkcl_jax.train", f"--config={spec}", f"--workdir={workdir}",
          *overrides]
