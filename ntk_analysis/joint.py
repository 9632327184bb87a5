"""JointKernel: one kernel over stacked per-task subsets, sliced into intra/inter-task blocks.

The subset indices per task are drawn once from (seed, task), stored with K and the metadata
(checkpoint id, method, readout, probe seed, PEFT groups, P), so kernels at different checkpoints
are over exactly the same images (docs/ntk_theory.md §3.2 "Data"). A run's task-end kernels live
at task_end_path(workdir, t).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ntk_analysis import kernel_memory, kernels, metrics


def task_end_path(workdir: str, task: int, view: str = "fused") -> str:
  """Where `python -m ntk_analysis.analyse --task_ends` writes the kernel at the end of `task`."""
  return os.path.join(workdir, "ntk", f"task{task}", f"kernel_{view}.npz")


def subset_indices(seed: int, task: int, population: int, n: int) -> np.ndarray:
  """n sorted indices in [0, population) drawn without replacement from (seed, task) only."""
  if n > population:
    raise ValueError(f"task {task}: asked for {n} samples from {population}; lower n")
  rng = np.random.default_rng([seed, task])
  return np.sort(rng.choice(population, size=n, replace=False))


@dataclasses.dataclass
class JointKernel:
  """K over the concatenation of the task subsets; task_index[i] = task of row i."""
  k: np.ndarray
  task_index: np.ndarray
  indices: dict  # task -> indices into that task's data
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def tasks(self) -> list:
    return sorted(self.indices)

  def rows(self, t) -> np.ndarray:
    return np.flatnonzero(self.task_index == t)

  def block(self, s, t) -> np.ndarray:
    """K(X_s, X_t) (leading two axes; trailing output axes kept)."""
    return self.k[np.ix_(self.rows(s), self.rows(t))]

  def intra(self) -> dict:
    return {t: self.block(t, t) for t in self.tasks}

  def inter(self) -> dict:
    return {(s, t): self.block(s, t) for s in self.tasks for t in self.tasks if s < t}

  def alignment(self, s, t) -> float:
    """rho(s, t) = ||K_st|| / sqrt(||K_ss|| ||K_tt||) (metrics.alignment of the blocks)."""
    return metrics.alignment(self.block(s, s), self.block(t, t), self.block(s, t))

  def mean_inter_alignment(self) -> float:
    """Mean rho over the task pairs s < t (NaN with one task)."""
    rho = [self.alignment(s, t) for s, t in self.inter()]
    return float(np.mean(rho)) if rho else float("nan")

  def save(self, path: str) -> None:
    """.npz with K, task_index, per-task indices and JSON metadata."""
    arrays = {"k": self.k, "task_index": self.task_index}
    arrays.update({f"indices_{t}": np.asarray(i) for t, i in self.indices.items()})
    np.savez_compressed(path, meta=np.asarray(json.dumps(self.meta, sort_keys=True)), **arrays)

  @classmethod
  def load(cls, path: str) -> "JointKernel":
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      indices = {int(n[len("indices_"):]): z[n] for n in z.files if n.startswith("indices_")}
      return cls(k=z["k"], task_index=z["task_index"], indices=indices, meta=meta)


def compute(f: Callable, params, task_data: Mapping[int, np.ndarray], *, n: int, seed: int,
            checkpoint: str = "", readout: str = "", probe_seed: Optional[int] = None,
            groups: Sequence[str] = (), kernel_fn: Optional[Callable] = None,
            **ntk_kwargs) -> JointKernel:
  """Draws n images per task from (seed, task), stacks them and computes one joint kernel with
  `kernel_fn` (a kernels.ntk_fn of f, reused across calls so it compiles once) or
  kernels.ntk_fn(f, **ntk_kwargs). task_data[t] needs only len() and indexing by an index
  array, so a lazy collection decodes the drawn images only (analyse.task_data)."""
  tasks = sorted(task_data)
  indices = {t: subset_indices(seed, t, len(task_data[t]), n) for t in tasks}
  x = np.concatenate([np.asarray(task_data[t][indices[t]]) for t in tasks])
  task_index = np.repeat(np.asarray(tasks), n)
  k = (kernel_fn or kernels.ntk_fn(f, **ntk_kwargs))(params, x)
  meta = {"checkpoint": checkpoint, "method": ntk_kwargs.get("method", "jacobian"),
          "trace": ntk_kwargs.get("trace", True), "readout": readout, "probe_seed": probe_seed,
          "groups": list(groups), "P": kernel_memory.num_params(params), "seed": seed, "n": n,
          "backend": ntk_kwargs.get("backend", "jax")}
  return JointKernel(k=np.asarray(k), task_index=task_index, indices=indices, meta=meta)
