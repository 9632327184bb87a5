"""The run's one log writer: JSON lines (WORKDIR/metrics.jsonl) and TensorBoard (WORKDIR/tb).

Only the main process writes; elsewhere every call does nothing. A resumed run first cuts
metrics.jsonl back to what was logged when its checkpoint was saved (`truncate`), so the lines
of the steps it redoes are not logged twice.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from tensorboardX import SummaryWriter

from ntkcl_jax import results


class MetricWriter:
  """Appends records to metrics.jsonl and scalars to TensorBoard (main process only)."""

  def __init__(self, workdir: str, *, active: bool, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.active = active
    self._tb: Optional[SummaryWriter] = None
    if active:  # purge_step drops TensorBoard events after the step a resumed run restarts from
      self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                               purge_step=resume_step + 1 if resume_step else None)

  def truncate(self, nbytes: int) -> None:
    """Cuts metrics.jsonl to its first `nbytes` bytes (what a checkpoint saw logged)."""
    if self.active and os.path.exists(self.path):
      with open(self.path, "r+") as f:
        f.truncate(min(int(nbytes), os.path.getsize(self.path)))

  def nbytes(self) -> int:
    """Bytes logged so far (saved with each checkpoint)."""
    return os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def write(self, record: dict) -> None:
    """One JSON line (numpy values converted, NaN -> null)."""
    if self.active:
      with open(self.path, "a") as f:
        f.write(json.dumps(results.jsonable(record)) + "\n")

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    """TensorBoard scalars `prefix/name` at `step`."""
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
