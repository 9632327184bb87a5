"""A finished (or running) training run, opened from its workdir: config, learner and state.

    config, learner, state, meta = runs.load_run(workdir)          # newest checkpoint
    state, meta = runs.restore_state(workdir, learner, checkpoint_id=7)

The config is the one saved with the checkpoints, the backbone is rebuilt from it, and the
learner runs on one device (the state is replicated, so any run's state restores on one device).
`compute` picks the learner's compute policy: 'float32' (the default, for analysis: float32,
matmul precision 'highest', einsum attention, no remat, whatever the run trained in) or 'run'
(the run's own `model.dtype`, `matmul_precision`, `attention`, `remat`). The policy never
changes the parameters: they are stored, restored and kept float32 either way.
The workdir may be local or a `gs://` URI (ntkcl_jax.paths).
"""
from __future__ import annotations

import json
from typing import Optional

from etils import epath
import jax
import ml_collections

from ntkcl_jax import checkpoints
from ntkcl_jax import config_files
from ntkcl_jax.configs import base
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import paths
from ntkcl_jax import results
from ntkcl_jax import same_run
from ntkcl_jax import sharding
from ntkcl_jax.checkpoints import run_state


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for k, v in saved.items():
    out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def config_from_json(cfg: dict) -> ml_collections.ConfigDict:
  """The run config saved with its checkpoints / results.json: keys added to the schema
  (ntkcl_jax/configs/base.py) since the run was saved take their defaults, as the same-run rule
  counts them (ntkcl_jax/same_run.py); tuples came back as lists; keys since removed, e.g.
  train.mesh_model of older runs, are dropped."""
  c = ml_collections.ConfigDict(_merged(same_run.config_json(base.get_config()), cfg))
  for key in config_files.REMOVED_KEYS:
    *sections, leaf = key.split(".")
    node = c
    for part in sections:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and leaf in node:
      del node[leaf]
  c.method.section_weights = tuple(c.method.section_weights)
  c.data.explicit_order = tuple(c.data.explicit_order)
  return c


COMPUTE = ("float32", "run")
# The `model` keys compute="float32" sets (ntkcl.POLICY_KEYS): a float32 forward and backward.
ANALYSIS_POLICY = {"dtype": "float32", "matmul_precision": "highest", "attention": "einsum",
                   "remat": False}


def _check_compute(compute: str) -> None:
  """ValueError naming the choices unless `compute` is one of COMPUTE."""
  if compute not in COMPUTE:
    raise ValueError(f"compute={compute!r}: 'float32' (float32, matmul precision 'highest') or "
                     "'run' (the run's own model.dtype and matmul_precision)")


def with_compute(config: ml_collections.ConfigDict, compute: str) -> ml_collections.ConfigDict:
  """A copy of a run config with the compute policy `compute` ('float32': ANALYSIS_POLICY,
  'run': the config's own), for rebuilding the learner of an analysis."""
  _check_compute(compute)
  config = config.copy_and_resolve_references()
  if compute == "float32":
    config.model.update(ANALYSIS_POLICY)
  return config


def _checkpointer(workdir: paths.PathLike) -> run_state.RunCheckpointer:
  return run_state.RunCheckpointer(paths.join(workdir, "checkpoints"), keep=100000,
                                   async_save=False)


def load_run(workdir: paths.PathLike, checkpoint_id: Optional[int] = None,
             compute: str = "float32"):
  """(config, learner, state, meta) of the newest (or given) checkpoint of a run's workdir, the
  learner (and the config returned) with the compute policy `compute` (COMPUTE); meta also holds
  `checkpoint_id`, `compute`, the run's own policy (`run_compute`) and, once the run finished,
  its `results`."""
  _check_compute(compute)
  ckdir = epath.Path(paths.join(workdir, "checkpoints"))
  if not ckdir.is_dir():
    raise FileNotFoundError(f"{ckdir} not found: point --workdir at a training run's workdir "
                            "(python -m ntkcl_jax.train --workdir=...)")
  ckpt = _checkpointer(workdir)
  ids = ckpt.all_ids()
  ckpt.close()
  if not ids:
    raise FileNotFoundError(f"{ckdir} holds no complete checkpoint")
  cid = int(ids[-1] if checkpoint_id is None else checkpoint_id)
  config = config_from_json(json.loads((ckdir / str(cid) / "meta" / "metadata").read_text())
                            ["config"])
  run_compute = {k: config.model[k] for k in ANALYSIS_POLICY}
  config = with_compute(config, compute)
  config.train.mesh_data = 1
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  learner = learner_lib.Learner(config, checkpoints.build_backbone(config), mesh)
  state, meta = restore_state(workdir, learner, cid)
  meta.update(compute=compute, run_compute=run_compute)
  finished = results.read(workdir)
  if finished is not None:
    meta["results"] = finished
  return config, learner, state, meta


def restore_state(workdir: paths.PathLike, learner, checkpoint_id: int):
  """(state, meta) of one checkpoint of a run, for a learner already built (load_run)."""
  ckpt = _checkpointer(workdir)
  abstract = learner.abstract_state(jax.random.PRNGKey(learner.config.seed))
  state, meta = ckpt.restore(int(checkpoint_id), abstract)
  ckpt.close()
  meta["checkpoint_id"] = int(checkpoint_id)
  return state, meta
