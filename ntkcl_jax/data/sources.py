"""Image sources: one split of one dataset as (original labels, a loader of uint8 images).

Kinds: ZIP archives and image folders in the `split/<class>/<file>` layout the official code
expects (`train/` and `test/` or `val/`; local or `gs://`), tensorflow-datasets data sources,
scikit-learn's bundled digits and synthetic class templates. Decoded images are cached in memory
(the offline sets are small); errors name the file and say what to do. On several hosts a folder
is listed once in total: each host walks its share of the class folders and the hosts exchange
the names (`folder_images(..., allgather=)`), and a tfds split's labels are read once in total
in the same way (`tfds_images(..., allgather=)`); every host can then read any image, as the rows
it feeds of a global batch may come from any class (docs/design.md, Data on several hosts). A tfds
dataset that is not prepared is downloaded only after its hosts answered within a timeout.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import socket
import threading
import urllib.parse
import zipfile
from typing import Callable, Optional

from etils import epath
import numpy as np
from PIL import Image, UnidentifiedImageError

from ntkcl_jax import paths

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
  """Data that cannot be used as configured; the message says what to do."""


def cache_budget_bytes() -> int:
  """Memory for decoded images per image set: $NTKCL_DATA_CACHE_MB (default 2048 MB)."""
  return int(float(os.environ.get("NTKCL_DATA_CACHE_MB", "2048")) * 2 ** 20)


class ImageSet:
  """labels: original class ids (int64, one per image); image(i): uint8 (H, W, 3).

  Decoded images are kept in memory until `cache_bytes` is used up (small sets are decoded
  once; large benchmarks are decoded on every access instead of exhausting RAM)."""

  def __init__(self, labels: np.ndarray, loader: Callable[[int], np.ndarray], names=None,
               class_names=None, description: str = "", cache_bytes: Optional[int] = None):
    self.labels = np.asarray(labels, np.int64)
    self._loader = loader
    self.names = names
    self.class_names = class_names
    self.description = description
    self.listed_by = 1  # hosts that shared the listing (folders of a multi-host run)
    self._cache: dict[int, np.ndarray] = {}
    self._cache_left = cache_budget_bytes() if cache_bytes is None else cache_bytes
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.labels)

  def image(self, i: int) -> np.ndarray:
    i = int(i)
    img = self._cache.get(i)
    if img is None:
      img = self._loader(i)
      with self._lock:
        if img.nbytes <= self._cache_left and i not in self._cache:
          self._cache[i] = img
          self._cache_left -= img.nbytes
    return img


def _decode(data: bytes, name: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"cannot decode image {name!r} ({e}); remove or replace the file") from e


def _by_class(names: list[str], where: str,
              classes: Optional[list[str]] = None) -> tuple[list[str], np.ndarray, list[str]]:
  """`class/.../file` paths -> (kept names, labels, class names), as torchvision's ImageFolder:
  the class is the top-level folder, ids follow the alphabetical class order. `classes` (all
  class folders, including empty ones) makes an empty class an error instead of a silent shift
  of every later class id."""
  names = sorted(n.strip("/") for n in names
                 if n.lower().endswith(IMAGE_EXTS) and "/" in n.strip("/"))
  found = sorted({n.split("/")[0] for n in names})
  classes = sorted(classes) if classes is not None else found
  if not classes:
    raise DataError(f"{where}: no images in a `<class>/<image file>` layout found; put each "
                    "class's images in its own folder")
  empty = sorted(set(classes) - set(found))
  if empty:
    raise DataError(f"{where}: class folder(s) {empty} contain no images ({IMAGE_EXTS}); add "
                    "images or remove the folder(s) from every split")
  index = {c: i for i, c in enumerate(classes)}
  return names, np.array([index[n.split("/")[0]] for n in names], np.int64), classes


def zip_images(path: str) -> ImageSet:
  """A stored ZIP of `label/file` entries (the ../shared/data archives)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: expected a ZIP archive of `<class>/<image>` "
                            "entries (see docs/design.md, Data)")
  try:
    zf = zipfile.ZipFile(path)
    names, labels, classes = _by_class(zf.namelist(), path)
    blobs = [zf.read(n) for n in names]
  except zipfile.BadZipFile as e:
    raise DataError(f"{path} is not a readable ZIP archive ({e}); download it again") from e
  return ImageSet(labels, lambda i: _decode(blobs[i], f"{path}:{names[i]}"), names, classes,
                  f"zip {path}")


def zip_labels(path: str) -> tuple[np.ndarray, list[str]]:
  """(original labels, class names) of a `<class>/<file>` ZIP from its directory alone."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: expected a ZIP archive of `<class>/<image>` "
                            "entries (see docs/design.md, Data)")
  with zipfile.ZipFile(path) as zf:
    return _by_class(zf.namelist(), path)[1:]


def folder_classes(root: str) -> list[str]:
  """The class folders of `root/<class>/...` (top level, hidden ones skipped), alphabetical."""
  r = epath.Path(root)
  if not r.is_dir():
    raise FileNotFoundError(f"image folder {root} not found: expected `{root}/<class>/<image>`")
  return sorted(e.name for e in r.iterdir() if e.is_dir() and not e.name.startswith("."))


def list_folder_share(root: str, classes: list[str], process_index: int = 0,
                      process_count: int = 1) -> list[str]:
  """`class/.../file` names under the class folders `classes[process_index::process_count]`:
  one host's share of a folder's listing (the shares of all hosts are disjoint and together
  list every file). Local folders follow symlinks; remote ones (`gs://`) are walked with epath."""
  def bare(p) -> str:  # fsspec walks yield `bucket/dir`, gfile `gs://bucket/dir`: compare bare
    return os.fspath(p).split("://", 1)[-1].strip("/")
  names = []
  for c in classes[process_index::process_count]:
    top = os.path.join(root, c)
    if paths.is_remote(root):
      walk = ((d, fs) for d, _, fs in epath.Path(top).walk())
    else:
      walk = ((d, fs) for d, _, fs in os.walk(top, followlinks=True))
    for dirpath, fnames in walk:
      rel = (posixpath.relpath(bare(dirpath), bare(root)) if paths.is_remote(root)
             else os.path.relpath(dirpath, root).replace(os.sep, "/"))
      names += [f"{rel}/{f}" for f in fnames]
  return names


def _list_folder(root: str, process_index: int = 0, process_count: int = 1,
                 allgather: Optional[Callable[[list], list]] = None):
  """(names, labels, class names) of an image folder. With `allgather` (every host's value of
  its argument, in host order: sharding.process_allgather_json), each of `process_count` hosts
  walks only its share of the class folders and the hosts exchange their lists, so a pod lists
  a large folder once in total; the result, sorted as on one host, is the same on every host."""
  classes = folder_classes(root)
  if allgather is None or process_count == 1:
    names = list_folder_share(root, classes)
  else:
    names = [n for part in allgather(list_folder_share(root, classes, process_index,
                                                       process_count)) for n in part]
  return _by_class(names, root, classes)


def folder_labels(root: str) -> tuple[np.ndarray, list[str]]:
  """(original labels, class names) of an image folder from its file names alone."""
  return _list_folder(root)[1:]


def folder_images(root: str, process_index: int = 0, process_count: int = 1,
                  allgather: Optional[Callable[[list], list]] = None) -> ImageSet:
  """An image folder `root/<class>/<file>` (torchvision ImageFolder layout, alphabetical ids),
  local or remote (`gs://`); listed by all hosts together when `allgather` is given
  (`_list_folder`)."""
  names, labels, classes = _list_folder(root, process_index, process_count, allgather)

  def load(i):
    p = os.path.join(root, names[i])
    return _decode(epath.Path(p).read_bytes(), p)
  s = ImageSet(labels, load, names, classes, f"folder {root}")
  s.listed_by = 1 if allgather is None else process_count
  return s


def array_images(images: np.ndarray, labels: np.ndarray, description: str,
                 class_names=None) -> ImageSet:
  images = np.asarray(images)
  return ImageSet(labels, lambda i: images[i], None, class_names, description, cache_bytes=0)


def digits_images(split: str) -> ImageSet:
  """scikit-learn's bundled 8x8 digits (1,797 images, always available): a seeded 75/25 split."""
  # lazy: scikit-learn is slow to import and only this source needs it
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  idx = np.random.RandomState(0).permutation(len(d.target))
  cut = int(0.75 * len(idx))
  idx = np.sort(idx[:cut] if split == "train" else idx[cut:])
  img = (d.images[idx] / 16.0 * 255).round().astype(np.uint8)
  return array_images(np.repeat(img[..., None], 3, -1), d.target[idx],
                      f"scikit-learn digits ({split})", [str(i) for i in range(10)])


def synthetic_images(split: str, num_classes: int, size: int, per_class: int) -> ImageSet:
  """Class templates plus Gaussian noise: separable, deterministic, instant (tests, tiny runs)."""
  templates = np.random.RandomState(1234).rand(num_classes, size, size, 3)
  r = np.random.RandomState(1 if split == "train" else 2)
  x = templates[:, None] + 0.25 * r.randn(num_classes, per_class, size, size, 3)
  x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8).reshape(-1, size, size, 3)
  return array_images(x, np.repeat(np.arange(num_classes), per_class),
                      f"synthetic ({num_classes} classes)")


def host_share(n: int, process_index: int = 0, process_count: int = 1) -> range:
  """The contiguous share [p*n/P, (p+1)*n/P) of `n` records that host p of P reads when the
  hosts list a dataset together; the shares of all hosts are disjoint and cover every record."""
  return range(n * process_index // process_count, n * (process_index + 1) // process_count)


def tfds_prepare_hint(name: str, data_dir: str) -> str:
  """The command that prepares a tfds dataset where the stream reads it (random access needs
  the array_record file format)."""
  return f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`"


def reachable(host: str, port: int, timeout: float) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds, name lookup
  included: the attempt runs in a daemon thread, so a lookup that hangs cannot hold the caller."""
  result = []

  def attempt():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)
  t = threading.Thread(target=attempt, daemon=True)
  t.start()
  t.join(timeout)
  return bool(result and result[0])


def check_download_hosts(name: str, urls, data_dir: str, timeout: float) -> None:
  """Before a tfds download: every host it downloads from (`urls`, the builder's checksum
  list) must answer within `timeout` s, else one line naming the dataset, the folder to put
  prepared files in and the command that prepares them (a download would hang or fail late)."""
  hosts = sorted({(u.hostname, u.port or (443 if u.scheme == "https" else 80))
                  for u in map(urllib.parse.urlsplit, urls or ()) if u.hostname})
  for host, port in hosts:
    if not reachable(host, port, timeout):
      raise DataError(
          f"tfds dataset {name!r} is not prepared under {data_dir} and its download host "
          f"{host}:{port} did not answer within {timeout:g} s; prepare it on a machine with "
          f"internet access ({tfds_prepare_hint(name, data_dir)}), copy the folder here and pass "
          f"--config.data.data_dir={data_dir}")


@contextlib.contextmanager
def socket_timeout(seconds: float):
  """Sockets opened inside the block give up after `seconds` without data (a stalled download
  fails instead of hanging); the previous default is restored after."""
  old = socket.getdefaulttimeout()
  socket.setdefaulttimeout(seconds)
  try:
    yield
  finally:
    socket.setdefaulttimeout(old)


def _tfds_source(name: str, split: str, data_dir: Optional[str], download: bool, decoders,
                 connect_timeout: float):
  """tfds.data_source of a prepared dataset; one that is not prepared is downloaded (when
  `download`) only after its download hosts answered (`check_download_hosts`), with a read
  timeout, so that no network problem can hang the launcher."""
  # lazy: tensorflow-datasets (and TensorFlow behind it) is heavy and only the tfds source needs it
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                            decoders=decoders)
  except Exception:  # pylint: disable=broad-except  # not prepared (tfds raises several kinds)
    if not download:
      raise
  where = data_dir or os.fspath(tfds.core.constants.DATA_DIR)
  check_download_hosts(name, tfds.builder(name, data_dir=data_dir or None).url_infos, where,
                       connect_timeout)
  with socket_timeout(max(60.0, connect_timeout)):
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=True,
                            decoders=decoders)


def tfds_images(name: str, split: str, data_dir: Optional[str] = None,
                download: bool = True, skip_decoding: bool = True, process_index: int = 0,
                process_count: int = 1, allgather: Optional[Callable[[list], list]] = None,
                connect_timeout: float = 10.0) -> ImageSet:
  """A tensorflow-datasets data source (random access, no TensorFlow).

  Images are read undecoded (`SkipDecoding`), so listing the labels touches no pixels and the
  JPEG/PNG decoding happens in the stream's threads, with the same cache and errors as ZIPs.
  `skip_decoding=False` for `tfds.testing.mock_data` (its random examples are arrays already).
  With `allgather` (sharding.process_allgather_json), each of `process_count` hosts reads the
  labels of its share of the records only (`host_share`) and the hosts exchange them."""
  # lazy: tensorflow-datasets (and TensorFlow behind it) is heavy and only the tfds source needs it
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = {"image": tfds.decode.SkipDecoding()} if skip_decoding else None
  where = data_dir or os.fspath(tfds.core.constants.DATA_DIR)
  try:
    src = _tfds_source(name, split, data_dir, download, decoders, connect_timeout)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not available under {where} and could not "
        f"be prepared ({type(e).__name__}: {e}). Prepare it on a machine with internet access "
        f"({tfds_prepare_hint(name, where)}) and pass --config.data.data_dir") from e
  share = host_share(len(src), process_index, process_count) if allgather else range(len(src))
  mine = [int(src[i]["label"]) for i in share]
  labels = np.array([y for part in allgather(mine) for y in part] if allgather else mine,
                    np.int64)

  def load(i):
    img = src[i]["image"]
    if isinstance(img, np.ndarray) and img.dtype.kind in "SO":
      img = img.item()
    if isinstance(img, (bytes, np.bytes_)):
      img = _decode(bytes(img), f"tfds {name} {split} example {i}")
    img = np.asarray(img, np.uint8)
    return np.repeat(img, 3, -1) if img.shape[-1] == 1 else img
  s = ImageSet(labels, load, None, None, f"tfds {name} ({split})")
  s.listed_by = process_count if allgather else 1
  return s


def verify_sha256(path: str, manifest: str, key: str) -> bool:
  """Checks an archive against MANIFEST.json once (a stamp under ~/.cache/ntkcl_jax records a
  verified hash). False when there is no manifest entry to check against."""
  if not os.path.exists(manifest):
    return False
  with open(manifest) as f:
    want = json.load(f).get(key, {}).get("sha256")
  if not want:
    return False
  stamp = os.path.join(os.path.expanduser("~"), ".cache", "ntkcl_jax", "verified",
                       want + ".ok")
  if os.path.exists(stamp):
    return True
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  if h.hexdigest() != want:
    raise DataError(f"{path}: sha256 {h.hexdigest()} does not match {manifest} ({want}); the "
                    "archive is corrupt or was changed: copy it again")
  os.makedirs(os.path.dirname(stamp), exist_ok=True)
  open(stamp, "w").close()
  return True
