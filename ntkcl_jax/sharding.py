"""Device mesh and named shardings: the modern pjit (jax.jit with explicit in/out shardings).

One data-parallel mesh over all devices of all hosts, axis 'data' (`jax.make_mesh`, which orders
the devices by the accelerator topology). Batches are split over 'data'; everything else (the
frozen backbone, the small trainable PEFT state, optimiser state) is replicated: a frozen-backbone
method trains a few MB of parameters and its ViT-B backbone fits on any accelerator, so data
parallelism is what scales (docs/design.md, Devices). Multi-host: each process feeds its own rows
of the global batch (`global_batch`), `initialize_distributed` starts `jax.distributed` when asked
to or when the environment is a multi-host job (`distributed_args`), eval batches of any size are
padded to the mesh (`pad_rows`), and `process_allgather_json` lets the hosts exchange host-side
records (dataset listings).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


# Environment variables that say this process is one of several hosts of one job, and so must
# start jax.distributed before anything else (JAX's own cluster detection then finds the
# coordinator): a TPU pod slice lists its workers, a multi-slice job has a megascale coordinator,
# a SLURM step has several tasks.
def detected_cluster(env: Mapping[str, str]) -> Optional[str]:
  """The multi-host environment `env` (e.g. os.environ) describes, as `NAME=value` of the
  variable that shows it, or None on a single host. A pure function of `env`."""
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    hosts = [h for h in env.get(name, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"{name}={env[name]}"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return f"MEGASCALE_COORDINATOR_ADDRESS={env['MEGASCALE_COORDINATOR_ADDRESS']}"
  if _int(env.get("MEGASCALE_NUM_SLICES")) > 1:
    return f"MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']}"
  if _int(env.get("SLURM_NTASKS")) > 1 and "SLURM_PROCID" in env:
    return f"SLURM_NTASKS={env['SLURM_NTASKS']}"
  return None


def _int(value: Optional[str]) -> int:
  """An environment variable's integer value, 0 when unset or not a number."""
  try:
    return int(value or 0)
  except ValueError:
    return 0


def distributed_args(env: Mapping[str, str], coordinator: str = "", num_processes: int = 1,
                     process_id: int = 0) -> Optional[dict]:
  """How this process starts jax.distributed: the keyword arguments of
  `jax.distributed.initialize` ({} = JAX discovers the cluster itself), or None for a
  single-process run. A pure function of the flags and the environment `env`.

  Explicit setups win: --coordinator / --num_processes / --process_id, or the variables
  NTKCL_COORDINATOR / NTKCL_NUM_PROCESSES / NTKCL_PROCESS_ID (num_processes -1: discover).
  Otherwise a multi-host environment (`detected_cluster`: a TPU pod, a multi-slice job, a
  SLURM step of several tasks) starts it automatically."""
  coordinator = coordinator or env.get("NTKCL_COORDINATOR", "")
  num_processes = int(env.get("NTKCL_NUM_PROCESSES", num_processes))
  process_id = int(env.get("NTKCL_PROCESS_ID", process_id))
  if num_processes > 1:
    if not coordinator:
      raise ValueError("a multi-process run needs a coordinator address (host:port): set "
                       "--coordinator or NTKCL_COORDINATOR")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}
  if num_processes == -1 or detected_cluster(env):
    return {}
  return None


def initialize_distributed(coordinator: str = "", num_processes: int = 1,
                           process_id: int = 0) -> Optional[str]:
  """Starts jax.distributed for a multi-process run (`distributed_args` of os.environ decides;
  no-op for one process). Returns how it was started (for the launcher's first line), or None."""
  args = distributed_args(os.environ, coordinator, num_processes, process_id)
  if args is None:
    return None
  jax.distributed.initialize(**args)
  if args:
    return f"coordinator {args['coordinator_address']}"
  return f"found by JAX ({detected_cluster(os.environ) or 'num_processes=-1'})"


def make_mesh(data: int = -1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D ('data',) mesh with classic GSPMD (Auto) axis type over `data` devices (-1: all).

  `devices` defaults to every device of every process; a smaller mesh (one process only) passes
  the devices it uses, e.g. `devices=jax.devices()[:1]`."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    data = len(devices)
  if data != len(devices):
    raise ValueError(f"a data mesh of {data} devices was asked for, but {len(devices)} devices are "
                     f"given; set train.mesh_data to -1 (all devices) or {len(devices)}")
  return jax.make_mesh((data,), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def put(tree: Any, shardings: Any) -> Any:
  """device_put that always copies, so donating the result never deletes the caller's arrays."""
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.array(x), s), tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return put(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's rows of a batch -> global jax.Arrays split over 'data'.

  Each process passes its contiguous share (rows [p*B/P, (p+1)*B/P) of the global batch), as
  `ntkcl_jax.data` yields them; with one process this is a plain sharded device_put. The rows go
  to this process's devices in mesh order; were those not contiguous on the mesh, the global
  batch would hold the same rows in another order, which a masked mean loss does not see.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def pad_rows(local: Mapping[str, np.ndarray], multiple: int) -> Mapping[str, np.ndarray]:
  """A batch with its rows padded to a multiple of `multiple` (e.g. this process's devices on
  the mesh), so that a batch of any size splits over any mesh: padded rows repeat the last row
  (finite features, so masked sums stay exact) and have mask False. Unchanged when it fits."""
  n = len(next(iter(local.values())))
  extra = -n % multiple
  if not extra or not n:
    return local
  if "mask" not in local:
    raise ValueError("padding a batch to the mesh needs its 'mask' (padded rows are masked out)")
  out = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], extra, axis=0)])
         for k, v in local.items()}
  out["mask"][n:] = False
  return out


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """The training batch must split evenly over the mesh's devices and the processes (eval
  batches need not: they are padded, `pad_rows`)."""
  n = mesh.shape[DATA]
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} devices "
                     f"of the data axis; choose a multiple of {n} (optim.batch_size) or set "
                     f"train.mesh_data")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")


def process_allgather_json(obj: Any) -> list:
  """Every process's JSON-able `obj`, in process order (one process: `[obj]`).

  For host-side records such as each host's share of a dataset listing (megabytes at most,
  ntkcl_jax/data/sources.py): they travel as uint8 arrays padded to the longest through
  `multihost_utils.process_allgather`, so every process must call this at the same point."""
  if jax.process_count() == 1:
    return [obj]
  # lazy: only multi-process runs need it
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  sizes = sizes.reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(rows[p, :int(n)]).decode()) for p, n in enumerate(sizes)]
