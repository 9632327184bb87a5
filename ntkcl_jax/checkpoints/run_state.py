"""Training-state checkpoints of a continual-learning run (orbax), so a run resumes from any step.

One checkpoint = the learner's state pytree (parameters, frozen prompt sets, optimiser state,
classifier and prototypes, RNG, accuracy matrix: whatever `Learner.init_state` returns, every leaf
of fixed shape) plus a JSON record: the learner's position (task, epoch, batch, phase), the config,
the class order, the per-task results so far and the launcher's own counters.

Checkpoints live in `WORKDIR/checkpoints/<id>/` (a local folder or a `gs://` URI: any directory
orbax writes to), where `id` is the launcher's event counter (one per train step or task end), so
ids only grow. Saves are asynchronous; orbax writes each into a `<id>.orbax-checkpoint-tmp*`
directory and renames it when complete (on object stores it commits with a marker file instead),
so a process killed mid-save leaves only a temporary directory, which is never listed as a
checkpoint and is deleted on the next start. `latest()` therefore only ever reads complete
checkpoints.
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ntkcl_jax import cli
from ntkcl_jax import paths
from ntkcl_jax.checkpoints.errors import CheckpointError

log = logging.getLogger(__name__)


class CheckpointWriteError(cli.InputError, RuntimeError):
  """A checkpoint could not be written (disk full, unwritable directory, ...): the environment,
  reported as one error line (exit code 2)."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
  """Typed PRNG keys -> their uint32 key data (orbax stores plain arrays only)."""
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(abstract: Any) -> Any:
  def conv(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return x
  return jax.tree_util.tree_map(conv, abstract)


def _from_storable(tree: Any, abstract: Any) -> Any:
  def conv(x, a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(x)  # the default (threefry) implementation
    return x
  return jax.tree_util.tree_map(conv, tree, abstract)


def _write_error(directory: str, err: BaseException) -> CheckpointWriteError:
  if isinstance(err, OSError) and err.errno == errno.ENOSPC:
    what = "the disk is full"
  elif isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    what = "the directory is not writable"
  else:
    what = f"{type(err).__name__}: {err}"
  return CheckpointWriteError(
      f"could not write a checkpoint under {directory}: {what}. The last complete checkpoint there "
      f"is kept and is what a restart resumes from; free space (or fix permissions) and rerun the "
      f"same command.")


class RunCheckpointer:
  """Saves and restores (state, meta) pairs under one directory; keeps the newest `keep`."""

  def __init__(self, directory: paths.PathLike, keep: int = 2, async_save: bool = True):
    self.directory = paths.normalize(directory)  # a local path made absolute, or a gs:// URI
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)
    except OSError as e:
      raise _write_error(self.directory, e) from e

  def latest_id(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_ids(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, ckpt_id: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save. Errors of the previous save surface here or in `wait`."""
    try:
      self._manager.save(ckpt_id, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_storable(state)), meta=ocp.args.JsonSave(meta)),
          force=True)
    except OSError as e:
      raise _write_error(self.directory, e) from e

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise _write_error(self.directory, e) from e

  def restore(self, ckpt_id: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores checkpoint `ckpt_id` into arrays shaped and sharded like `abstract_state`
    (ShapeDtypeStructs, e.g. from jax.eval_shape(learner.init_state, key) plus shardings)."""
    target = _abstract_storable(abstract_state)
    try:
      out = self._manager.restore(ckpt_id, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {ckpt_id} in {self.directory} does not fit this learner's state (was it "
          f"written by another version of the code or config?): {e}. Use a new --workdir, or the "
          f"code that wrote it") from e
    return _from_storable(out["state"], abstract_state), dict(out["meta"])

  def latest(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
    """The newest complete checkpoint as (state, meta), or None if there is none."""
    ckpt_id = self.latest_id()
    if ckpt_id is None:
      return None
    return self.restore(ckpt_id, abstract_state)

  def close(self) -> None:
    try:
      self._manager.close()
    except OSError as e:
      raise _write_error(self.directory, e) from e


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """Attaches shardings (a matching pytree, or one sharding for every leaf) to ShapeDtypeStructs."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)


def state_nbytes(abstract: Any) -> int:
  """Size of a state pytree in bytes (to check free disk space before a run)."""
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in jax.tree_util.tree_leaves(_abstract_storable(abstract))))
