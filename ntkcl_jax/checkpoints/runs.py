"""A finished (or running) training run, opened from its workdir: config, learner and state.

    config, learner, state, meta = runs.load_run(workdir)          # newest checkpoint
    state, meta = runs.restore_state(workdir, learner, checkpoint_id=7)

The config is the one saved with the checkpoints, the backbone is rebuilt from it, and the
learner runs on one device (the state is replicated, so any run's state restores on one device).
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


def _checkpointer(workdir: paths.PathLike) -> run_state.RunCheckpointer:
  return run_state.RunCheckpointer(paths.join(workdir, "checkpoints"), keep=100000,
                                   async_save=False)


def load_run(workdir: paths.PathLike, checkpoint_id: Optional[int] = None):
  """(config, learner, state, meta) of the newest (or given) checkpoint of a run's workdir;
  meta also holds `checkpoint_id` and, once the run finished, its `results`."""
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
  config.train.mesh_data = 1
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  learner = learner_lib.Learner(config, checkpoints.build_backbone(config), mesh)
  state, meta = restore_state(workdir, learner, cid)
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
