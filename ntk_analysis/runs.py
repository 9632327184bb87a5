"""NTK-CL runs as the analysis sees them: the learner state of a workdir, per-task data subsets,
and f(params, x) readouts over the trainable PEFT parameters (frozen backbone closed over).

Readouts (spec ntk_analysis.md 3.3): the feature sketch V^T phi(x) of a view phi in
{channel, patch, fused} (R fixed probes shared across tasks and checkpoints), or all three views
stacked (the "tripled features" kernel).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

VIEWS = ("channel", "patch", "fused")


def config_from_json(cfg: dict) -> ml_collections.ConfigDict:
  """The run config saved with its checkpoints / results.json (tuples came back as lists)."""
  c = ml_collections.ConfigDict(cfg)
  c.method.section_weights = tuple(c.method.section_weights)
  c.data.explicit_order = tuple(c.data.explicit_order)
  return c


def load_run(workdir: str, checkpoint_id: Optional[int] = None):
  """(config, learner, state, meta) of the newest (or given) checkpoint of a run's workdir."""
  from ntkcl_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import learner as learner_lib  # pylint: disable=g-import-not-at-top
  from ntkcl_jax.checkpoints import run_state  # pylint: disable=g-import-not-at-top
  ckdir = os.path.join(workdir, "checkpoints")
  results = os.path.join(workdir, "results.json")
  if not os.path.isdir(ckdir):
    raise FileNotFoundError(f"{ckdir} not found: point --workdir at a training run's workdir "
                            "(python -m ntkcl_jax.train --workdir=...)")
  ckpt = run_state.RunCheckpointer(ckdir, keep=100000, async_save=False)
  ids = ckpt.all_ids()
  if not ids:
    raise FileNotFoundError(f"{ckdir} holds no complete checkpoint")
  cid = int(ids[-1] if checkpoint_id is None else checkpoint_id)
  with open(os.path.join(ckdir, str(cid), "meta", "metadata")) as f:
    meta_cfg = json.load(f)["config"]
  config = config_from_json(meta_cfg)
  config.train.mesh_data, config.train.mesh_model = 1, 1
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  backbone = train.build_backbone(config)
  learner = learner_lib.Learner(config, backbone, mesh)
  ckpt.close()
  state, meta = restore_state(workdir, learner, cid)
  if os.path.exists(results):
    with open(results) as f:
      meta["results"] = json.load(f)
  meta["checkpoint_id"] = cid
  return config, learner, state, meta


def restore_state(workdir: str, learner, checkpoint_id: int):
  """(state, meta) of one checkpoint of a run, for a learner already built (load_run)."""
  from ntkcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from ntkcl_jax.checkpoints import run_state  # pylint: disable=g-import-not-at-top
  ckpt = run_state.RunCheckpointer(os.path.join(workdir, "checkpoints"), keep=100000,
                                   async_save=False)
  abstract = jax.eval_shape(learner.init_state, jax.random.PRNGKey(learner.config.seed))
  abstract = run_state.with_shardings(abstract, sharding.replicated(learner.mesh))
  state, meta = ckpt.restore(int(checkpoint_id), abstract)
  ckpt.close()
  meta["checkpoint_id"] = int(checkpoint_id)
  return state, meta


def task_data(stream):
  """({task: training images under the test transform}, {task: their labels}) of every task."""
  images, labels = {}, {}
  for t, classes in enumerate(stream.tasks):
    xs, ys = [], []
    for batch in stream.eval_batches("proto", classes, 64):
      m = np.asarray(batch["mask"])
      xs.append(np.asarray(batch["image"])[m])
      ys.append(np.asarray(batch["label"])[m])
    images[t], labels[t] = np.concatenate(xs), np.concatenate(ys)
  return images, labels


def probes(dim: int, r: int, seed: int = 0) -> np.ndarray:
  """Fixed (dim, R) probes, N(0, I/(dim R)), shared by every task and checkpoint of a study."""
  from ntk_analysis import kernels  # pylint: disable=g-import-not-at-top
  return np.asarray(kernels.default_probes(jax.random.PRNGKey(seed), dim, r))


def readout(learner, state, view: str, probe_matrix):
  """(f, params): f(params, x) -> (N, R) sketch of a view (or (N, 3R) for view='all')."""
  from ntkcl_jax.models import ntkcl  # pylint: disable=g-import-not-at-top
  spec, backbone, frozen = learner.spec, learner.backbone, learner.frozen(state)
  params = learner.trainable(state)
  v = jnp.asarray(probe_matrix)
  if view != "all" and view not in VIEWS:
    raise ValueError(f"view={view!r}; one of {VIEWS + ('all',)}")

  def f(p, x):
    feats = ntkcl.features(spec, backbone, p, frozen, x, train=False)
    if view == "all":
      return jnp.concatenate([feats[k] @ v for k in VIEWS], axis=-1)
    return feats[view] @ v
  return f, params
