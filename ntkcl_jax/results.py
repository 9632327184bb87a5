"""results.json of a run: per-task records -> accuracy matrix, summary metrics, versions; and the
accuracy matrix as text.

    record = results.task_record(learner.evaluate(...), task)    # one per finished task
    out = results.build(records, num_tasks, class_order, config, wall_time_s, topk, tasks)
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
from typing import Any, Optional

from etils import epath
import flax
import jax
import numpy as np
import optax
import orbax.checkpoint

from ntkcl_jax import metrics
from ntkcl_jax import paths

RESULTS_KEYS = ("accuracy_matrix", "avg_incremental_accuracy", "last_accuracy", "forgetting",
                "backward_transfer", "topk_accuracy", "old_new_accuracy", "class_order", "config",
                "versions", "wall_time_s")


def jsonable(x: Any) -> Any:
  """numpy / jax scalars and arrays -> plain JSON values (NaN -> None)."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def atomic_write_json(path, obj: Any) -> None:
  """Writes JSON so that it is never seen half-written (local: temporary file + rename; object
  stores: one upload), on any path ntkcl_jax.paths accepts (`gs://...` included)."""
  paths.write_bytes_atomic(path, json.dumps(obj, indent=1).encode())


def read(workdir: paths.PathLike) -> Optional[dict]:
  """The results.json of a run's workdir (any path ntkcl_jax.paths accepts), or None while the run
  has none; a file that is not a results.json written by ntkcl_jax.train is a ValueError saying
  what to do."""
  path = epath.Path(paths.join(workdir, "results.json"))
  if not path.exists():
    return None
  remedy = "delete it (or its run directory) to rerun that run"
  try:
    out = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not a results.json ({e}); {remedy}") from e
  if not isinstance(out, dict) or not isinstance(out.get("config"), dict):
    raise ValueError(f"{path} has no config: not a results.json written by ntkcl_jax.train; "
                     f"{remedy}")
  return out


def cpu() -> str:
  """The CPU's model name (XLA compiles for the host CPU, so float rounding, and so a run's last
  digits, can differ between CPU models)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions() -> dict:
  return {"python": platform.python_version(), "cpu": cpu(), "jax": jax.__version__,
          "jaxlib": importlib.metadata.version("jaxlib"),
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__}


def task_record(result: dict, task: int) -> dict:
  """The learner's evaluation after task `task` -> {task, per_task (t+1 values, %), top1, topk,
  old, new, losses}, with A_t rounded to 2 decimals as the official code does (docs/method.md §4.2)."""
  return jsonable({
      "task": int(result["task"]),
      "per_task": [float(v) for v in
                   np.asarray(result["per_task_accuracy"], np.float64).reshape(-1)[:task + 1]],
      "top1": float(np.around(float(result["top1"]), 2)),
      "topk": result["topk"],
      "old": result["old_accuracy"],
      "new": result["new_accuracy"],
      "losses": result["losses"],
  })


def build(task_records: list[dict], num_tasks: int, class_order, config, wall_time_s: float,
          topk: int, tasks_classes=None, oracle: Optional[dict] = None) -> dict:
  """results.json from the per-task records (one per finished task). `oracle`: the task record
  of the final state evaluated with every seen class's prototype recomputed from its training
  images (train.py; a diagnostic of stale prototypes, not a result any exemplar-free method
  reaches)."""
  r = np.full((num_tasks, num_tasks), np.nan)
  for rec in task_records:
    t = rec["task"]
    r[t, :len(rec["per_task"])] = rec["per_task"]
  steps = [rec["top1"] for rec in task_records]
  summary = metrics.summarize(r, steps)
  topks = [rec["topk"] for rec in task_records]
  return {
      "accuracy_matrix": jsonable(r),
      "avg_incremental_accuracy": summary["avg_incremental_accuracy"],
      "last_accuracy": summary["last_accuracy"],
      "forgetting": summary["forgetting"],
      "backward_transfer": summary["backward_transfer"],
      "learning_accuracy": summary["learning_accuracy"],
      "task_averaged_accuracy": summary["task_averaged_accuracy"],
      "accuracy_per_step": steps,
      "topk_accuracy": {"k": topk, "per_step": topks,
                        "average": (float(np.mean(topks)) if all(k is not None for k in topks)
                                    else None)},
      "old_new_accuracy": [{"old": rec["old"], "new": rec["new"]} for rec in task_records],
      "losses": [rec["losses"] for rec in task_records],
      "class_order": jsonable(class_order),
      "tasks": jsonable(tasks_classes) if tasks_classes is not None else None,
      "config": json.loads(config.to_json_best_effort()),
      "versions": versions(),
      "wall_time_s": wall_time_s,
      **({} if oracle is None else {"oracle_prototypes": {
          k: oracle[k] for k in ("task", "per_task", "top1", "old", "new")}}),
  }


def format_matrix(acc_matrix) -> str:
  """The accuracy matrix as a text table (row t = after task t; '-' for tasks not yet seen)."""
  r = np.asarray(acc_matrix, np.float64)
  t = r.shape[0]
  rows = ["after \\ task " + "".join(f"{s:>8d}" for s in range(t))]
  for i in range(t):
    cells = "".join("       -" if np.isnan(v) else f"{v:8.2f}" for v in r[i])
    rows.append(f"task {i:<8d}" + cells)
  return "\n".join(rows)


def fmt(v) -> str:
  """A percentage with 2 decimals, or n/a for None (e.g. forgetting of a one-task run)."""
  return "n/a" if v is None else f"{v:.2f}"
