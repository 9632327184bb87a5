"""Run directories on any file system orbax writes to: local folders and URIs such as `gs://b/run`.

Local paths are made absolute (orbax needs that); a URI is kept as given, since `os.path` would
turn `gs://b/run` into `$PWD/gs:/b/run`. Files go through etils.epath, which reaches gs:// with
TensorFlow's gfile or fsspec (gcsfs); local-only operations (free disk space, fsync, rename)
are used on local paths only (docs/design.md, Workdir on any file system).
"""
from __future__ import annotations

import os
import re
from typing import Union

from etils import epath

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
