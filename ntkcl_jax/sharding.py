"""Device mesh and named shardings: the modern pjit (jax.jit with explicit in/out shardings).

One mesh over all devices of all hosts with axes ('data', 'model'). Batches are split over
'data'; parameters are replicated, except large backbone matrices, which may be split over
'model' (`param_shardings`). Multi-host: each process feeds its own rows of the global batch
(`global_batch`), and `initialize_distributed` starts `jax.distributed` when asked to.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def initialize_distributed(coordinator: str = "", num_processes: int = 1,
                           process_id: int = 0) -> None:
  """Starts jax.distributed for a multi-process run (no-op for one process).

  Arguments fall back to the env vars NTKCL_COORDINATOR, NTKCL_NUM_PROCESSES, NTKCL_PROCESS_ID;
  on a TPU pod, pass num_processes=-1 to let JAX discover the topology itself.
  """
  coordinator = coordinator or os.environ.get("NTKCL_COORDINATOR", "")
  num_processes = int(os.environ.get("NTKCL_NUM_PROCESSES", num_processes))
  process_id = int(os.environ.get("NTKCL_PROCESS_ID", process_id))
  if num_processes == -1:
    jax.distributed.initialize()
  elif num_processes > 1:
    if not coordinator:
      raise ValueError("a multi-process run needs a coordinator address (host:port): set "
                       "--coordinator or NTKCL_COORDINATOR")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(data: int = -1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'model') mesh with classic GSPMD (Auto) axes; data=-1 uses all devices."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"{len(devices)} devices cannot be split into model axis {model}")
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh {data}x{model} needs {data * model} devices, found {len(devices)}")
  # Explicit axis types would make model-parallel matmuls raise "ambiguous output sharding".
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL),
              axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def param_shardings(params: Any, mesh: Mesh, min_model_size: int = 1 << 20) -> Any:
  """Replicates every leaf, except matrices of at least `min_model_size` elements whose last
  dimension divides the 'model' axis: those are split along it (tensor parallelism)."""
  model = mesh.shape[MODEL]

  def spec(x):
    if model > 1 and x.ndim >= 2 and x.size >= min_model_size and x.shape[-1] % model == 0:
      return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), MODEL))
    return replicated(mesh)

  return jax.tree_util.tree_map(spec, params)


def put(tree: Any, shardings: Any) -> Any:
  """device_put that always copies, so donating the result never deletes the caller's arrays."""
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.array(x), s), tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return put(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of a batch -> global jax.Arrays split over 'data'.

  Each process passes its contiguous share (rows [p*B/P, (p+1)*B/P) of the global batch), as
  `ntkcl_jax.data` yields them; with one process this is a plain sharded device_put.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA]
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} devices "
                     f"of the data axis; choose a multiple of {n} (optim.batch_size) or set "
                     f"train.mesh_data")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
