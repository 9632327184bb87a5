"""Run directories on any file system orbax writes to: local folders and URIs such as `gs://b/run`.

Local paths are made absolute (orbax needs that); a URI is kept as given, since `os.path` would
turn `gs://b/run` into `$PWD/gs:/b/run`. Files go through etils.epath, which reaches gs:// with
TensorFlow's gfile or fsspec (gcsfs); local-only operations (free disk space, fsync, rename)
are used on local paths only (docs/design.md, Workdir on any file system).

`WorkdirLock` lets one launcher at a time use a workdir (WORKDIR/.lock names the holder).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Optional, Union

from etils import epath

from ntkcl_jax import cli

PathLike = Union[str, os.PathLike]
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: PathLike) -> bool:
  """True for a URI (`gs://...`, `s3://...`); False for a local path (`file://` included)."""
  s = os.fspath(path)
  return bool(_URI.match(s)) and not s.startswith("file://")


def normalize(path: PathLike) -> str:
  """A run directory as a string: an absolute local path (`file://` and `~` resolved), or the URI
  as given (trailing '/' dropped)."""
  s = os.fspath(path)
  if is_remote(s):
    return s.rstrip("/") if not s.endswith("://") else s
  if s.startswith("file://"):
    s = s[len("file://"):]
  return os.path.abspath(os.path.expanduser(s))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string (URIs keep their `scheme://`)."""
  return os.fspath(epath.Path(normalize(path)).joinpath(*parts))


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes a whole file so that readers never see it half-written: locally a temporary file,
  fsync and rename; on an object store one upload (objects appear whole when the upload ends)."""
  s = normalize(path)
  if is_remote(s):
    epath.Path(s).write_bytes(data)
    return
  tmp = s + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, s)


def upload_tree(local: str, target: PathLike) -> None:
  """Copies a local folder's files to `target` (any path: an object store too), each file whole."""
  for folder, _, files in os.walk(local):
    dst = epath.Path(normalize(target)) / os.path.relpath(folder, local)
    dst.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        (dst / name).write_bytes(f.read())


LOCK_NAME = ".lock"
LOCK_STALE_S = 300.0  # object stores: a lock not renewed for this long is a crashed launcher's


def _holder_text(holder: dict) -> str:
  """'pid P on host H' of a lock's holder."""
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _read_holder(path: str) -> dict:
  """The JSON a lock file holds ({} when it is empty, half-written or unreadable)."""
  try:
    return dict(json.loads(epath.Path(path).read_text() or "{}"))
  except (OSError, ValueError, TypeError):
    return {}


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the open file `fd` (a removed lock file does not)."""
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


class WorkdirLock:
  """One launcher per workdir, held while it runs (`with WorkdirLock(workdir):`); a second one
  is refused with one line naming the holder's host and pid.

  Local folders: `fcntl.flock` on WORKDIR/.lock, which the OS releases when the holder exits in
  any way (SIGKILL included), so a crash never leaves a lock behind (the file may stay, unlocked:
  the next launcher takes it); the file names the holder and is removed on release.
  Object stores have no locks: WORKDIR/.lock holds the holder's host, pid and the time it last
  renewed it (a thread renews it every LOCK_STALE_S / 5 s) and is deleted on release; a lock not
  renewed for `stale_s` seconds is a crashed launcher's and is taken over (best effort: two
  launchers starting within the same second can both get through)."""

  def __init__(self, workdir: PathLike, stale_s: float = LOCK_STALE_S):
    self.workdir = normalize(workdir)
    self.path = join(self.workdir, LOCK_NAME)
    self.remote = is_remote(self.workdir)
    self.stale_s = stale_s
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._renewer: Optional[threading.Thread] = None

  def __enter__(self) -> "WorkdirLock":
    """Takes the lock (`acquire`) for the block."""
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    """Gives the lock up however the block ends."""
    self.release()

  def _refuse(self, holder: dict, extra: str = "") -> cli.InputError:
    """The one-line refusal naming the launcher that holds the lock."""
    return cli.InputError(
        f"workdir {self.workdir} is in use by another launcher ({_holder_text(holder)}, lock "
        f"{self.path}{extra}); wait for it to finish or stop it, or choose another --workdir")

  def acquire(self) -> None:
    """Takes the lock or raises cli.InputError naming the launcher that holds it."""
    if self.remote:
      self._acquire_remote()
      return
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._refuse(_read_holder(self.path)) from e
        logging.warning("cannot lock %s (%s): two launchers could share this workdir", self.path,
                        e)
        return
      if _same_file(fd, self.path):
        break
      os.close(fd)  # its holder removed the file between our open and lock: open it anew
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({**self.holder, "time": time.time()}).encode())
    self._fd = fd

  def _acquire_remote(self) -> None:
    """Object stores: refuses a lock renewed within `stale_s`, else writes this one's and
    starts renewing it."""
    p = epath.Path(self.path)
    if p.exists():
      held = _read_holder(self.path)
      age = time.time() - float(held.get("time", 0))
      if age < self.stale_s:
        raise self._refuse(held, f", renewed {age:.0f} s ago; a lock not renewed for "
                                 f"{self.stale_s:.0f} s is taken over")
      logging.warning("taking over the stale lock %s of %s (not renewed for %.0f s)", self.path,
                      _holder_text(held), age)
    self._write_remote()
    self._renewer = threading.Thread(target=self._renew, daemon=True)
    self._renewer.start()

  def _write_remote(self) -> None:
    """Writes (or renews) this launcher's lock file with the time now."""
    epath.Path(self.path).write_text(json.dumps({**self.holder, "time": time.time()}))

  def _renew(self) -> None:
    """The renewing thread: rewrites the lock every stale_s / 5 s until released."""
    while not self._stop.wait(self.stale_s / 5):
      try:
        self._write_remote()
      except Exception as e:  # pylint: disable=broad-except  # retried at the next renewal
        logging.warning("could not renew the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    """Gives the lock up (an object store's lock file is deleted if it is still this one's)."""
    if self._fd is not None:
      if _same_file(self._fd, self.path):
        os.unlink(self.path)  # while still locked: a launcher that opened it retries (acquire)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._renewer is not None:
      self._stop.set()
      self._renewer.join()
      self._renewer = None
      if _read_holder(self.path).get("token") == self.holder["token"]:
        epath.Path(self.path).unlink(missing_ok=True)
