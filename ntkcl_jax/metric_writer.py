"""The run's one log writer: JSON lines (WORKDIR/metrics.jsonl) and TensorBoard (WORKDIR/tb).

Only the main process writes; elsewhere every call does nothing. A resumed run first cuts
metrics.jsonl back to what was logged when its checkpoint was saved (`truncate`), so the lines
of the steps it redoes are not logged twice.

Any workdir ntkcl_jax.paths accepts works. Locally lines are appended as they come. Object stores
(`gs://`) cannot append or truncate, so there the log is kept in memory and the whole file is
uploaded at `nbytes` (every checkpoint save: a checkpoint never counts lines the file lacks),
`flush` and `close`. tensorboardX writes only local files (its gs:// writer needs
google-cloud-storage), so for a remote workdir it writes to a local temporary folder whose event
files are copied to WORKDIR/tb at every `flush` and at `close`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

from etils import epath

from ntkcl_jax import paths
from ntkcl_jax import results


class MetricWriter:
  """Appends records to metrics.jsonl and scalars to TensorBoard (main process only)."""

  def __init__(self, workdir: paths.PathLike, *, active: bool, resume_step: int = 0):
    workdir = paths.normalize(workdir)
    self.path = paths.join(workdir, "metrics.jsonl")
    self.active = active
    self.remote = paths.is_remote(workdir)
    self._tb_dir = paths.join(workdir, "tb")
    self._tb_local: Optional[str] = None  # local stand-in folder of a remote tb/
    self._tb: Optional[Any] = None  # tensorboardX.SummaryWriter
    self._log = bytearray()  # remote: the whole of metrics.jsonl
    self._dirty = False
    if not active:
      return
    if self.remote:
      p = epath.Path(self.path)
      self._log = bytearray(p.read_bytes() if p.exists() else b"")
      self._tb_local = tempfile.mkdtemp(prefix="ntkcl_tb_")
    # imported here: tensorboardX imports PyTorch where it is installed (over a second), which a
    # launcher that stops at a bad input never needs
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # purge_step drops TensorBoard events after the step a resumed run restarts from; the
    # suffix keeps a restart within the same second from overwriting the previous event file
    self._tb = SummaryWriter(self._tb_local or self._tb_dir,
                             purge_step=resume_step + 1 if resume_step else None,
                             filename_suffix=f".{time.time_ns()}")

  def truncate(self, nbytes: int) -> None:
    """Cuts metrics.jsonl to its first `nbytes` bytes (what a checkpoint saw logged)."""
    if not self.active:
      return
    if self.remote:
      if len(self._log) > nbytes:
        del self._log[int(nbytes):]
        self._dirty = True
        self._upload_log()
    elif os.path.exists(self.path):
      with open(self.path, "r+") as f:
        f.truncate(min(int(nbytes), os.path.getsize(self.path)))

  def nbytes(self) -> int:
    """Bytes logged so far (saved with each checkpoint); remote logs are uploaded first."""
    if self.remote:
      self._upload_log()
      return len(self._log)
    return os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def write(self, record: dict) -> None:
    """One JSON line (numpy values converted, NaN -> null)."""
    if not self.active:
      return
    line = json.dumps(results.jsonable(record)) + "\n"
    if self.remote:
      self._log += line.encode()
      self._dirty = True
    else:
      with open(self.path, "a") as f:
        f.write(line)

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    """TensorBoard scalars `prefix/name` at `step`."""
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._upload_tb()
    if self.active:
      self._upload_log()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._upload_tb()
      self._tb = None
      if self._tb_local:
        shutil.rmtree(self._tb_local, ignore_errors=True)
        self._tb_local = None
    if self.active:
      self._upload_log()

  def _upload_log(self) -> None:
    if self.remote and self._dirty:
      epath.Path(self.path).write_bytes(bytes(self._log))
      self._dirty = False

  def _upload_tb(self) -> None:
    """Copies the local stand-in's event files to the remote tb/ (each file whole)."""
    if not self._tb_local:
      return
    for folder, _, files in os.walk(self._tb_local):
      dst = epath.Path(self._tb_dir) / os.path.relpath(folder, self._tb_local)
      dst.mkdir(parents=True, exist_ok=True)
      for name in files:
        with open(os.path.join(folder, name), "rb") as f:
          (dst / name).write_bytes(f.read())
