"""What the analysis reads of a training run: its kept checkpoints (which one ends which task) and
its task images, on any path ntkcl_jax.paths accepts (`gs://` included, through epath).

    ends = run_data.task_end_checkpoints(workdir)     # {task: checkpoint id}
    images, labels = run_data.task_data(stream)       # {task: TaskImages}, {task: labels}
"""
from __future__ import annotations

import json

from etils import epath
import numpy as np

from ntkcl_jax import paths
from ntkcl_jax.checkpoints import run_state


class TaskImages:
  """One task's training images under the test transform, decoded only when indexed: images[idx]
  -> the model's normalised float32 input of those images (an index array, slice or int), in the
  order of stream.eval_batches('proto', the task's classes); len() needs no decoding."""

  def __init__(self, stream, classes):
    rows, new = stream.train_idx, stream.train_new
    self.stream, self.rows = stream, rows[np.isin(new[rows], list(classes))]
    self.labels = new[self.rows].astype(np.int32)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, idx) -> np.ndarray:
    rows = np.atleast_1d(self.rows[idx])
    # pylint: disable-next=protected-access  # the stream's cached test-transform decode
    images = np.stack([self.stream._eval_image("proto", int(i)) for i in rows])
    out = self.stream.model_input(images)
    return out if np.ndim(self.rows[idx]) else out[0]

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[np.arange(len(self))]
    return out if dtype is None else out.astype(dtype)


def task_data(stream):
  """({task: TaskImages, the training images under the test transform as the model's normalised
  float32 input}, {task: their labels}) of every task. Nothing is decoded until indexed: the
  kernels draw their subsets first and decode those images only."""
  images = {t: TaskImages(stream, classes) for t, classes in enumerate(stream.tasks)}
  return images, {t: im.labels for t, im in images.items()}


def split_images(stream, split: str, classes, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(model inputs, labels) of the images of these classes in a split: 'proto' (training images,
  test transform) or 'test'."""
  xs, ys = [], []
  for b in stream.eval_batches(split, classes, batch):
    m = np.asarray(b["mask"])
    xs.append(stream.model_input(np.asarray(b["image"])[m]))
    ys.append(np.asarray(b["label"])[m])
  return np.concatenate(xs), np.concatenate(ys)


def checkpoint_metas(workdir: str) -> dict:
  """{checkpoint id: its saved metadata (position, counters, task_records)} of a run."""
  ckdir = paths.join(workdir, "checkpoints")
  ids = []
  if epath.Path(ckdir).is_dir():
    ck = run_state.RunCheckpointer(ckdir, keep=100000, async_save=False)
    ids = [int(i) for i in ck.all_ids()]
    ck.close()
  if not ids:
    raise FileNotFoundError(f"{ckdir}: no complete checkpoint there; point --workdir at a "
                            "training run's workdir (python -m ntkcl_jax.train --workdir=...)")
  return {cid: json.loads((epath.Path(ckdir) / str(cid) / "meta" / "metadata").read_text())
          for cid in ids}


def task_end_checkpoints(workdir: str) -> dict:
  """{task t: id of the checkpoint saved at the end of task t} among the kept checkpoints."""
  ends = {}
  for cid, meta in sorted(checkpoint_metas(workdir).items()):
    pos, done = meta["position"], len(meta["task_records"])
    if pos["task"] == done and pos["epoch"] == 0 and pos["batch"] == 0 and done > 0:
      ends.setdefault(done - 1, cid)
  return ends


def num_tasks(workdir: str) -> int:
  """Tasks of the run's protocol (as saved with its checkpoints)."""
  metas = checkpoint_metas(workdir)
  return int(metas[max(metas)]["num_tasks"])


def require_task_ends(workdir: str, tasks) -> dict:
  """task_end_checkpoints, or a FileNotFoundError naming the tasks whose end checkpoint is gone
  and how to retrain so that they are kept."""
  ends = task_end_checkpoints(workdir)
  missing = sorted(set(tasks) - set(ends))
  if missing:
    n = num_tasks(workdir)
    raise FileNotFoundError(
        f"{workdir}: no checkpoint of the end of tasks {missing} (only the newest "
        f"train.keep_checkpoints are kept); retrain with --config.train.keep_checkpoints="
        f"{n + 1} --config.train.checkpoint_every_steps=0 (or a keep_checkpoints of at least "
        "steps plus tasks)")
  return ends
