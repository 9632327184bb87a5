"""Image sources: one split of one dataset as (original labels, a loader of uint8 images).

Kinds: ZIP archives and image folders in the `split/<class>/<file>` layout the official code
expects (`train/` and `test/` or `val/`), tensorflow-datasets data sources, scikit-learn's bundled
digits and synthetic class templates. Decoded images are cached in memory (the offline sets are
small); errors name the file and say what to do.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from typing import Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
  """Data that cannot be used as configured; the message says what to do."""


class ImageSet:
  """labels: original class ids (int64, one per image); image(i): uint8 (H, W, 3)."""

  def __init__(self, labels: np.ndarray, loader: Callable[[int], np.ndarray], names=None,
               class_names=None, description: str = ""):
    self.labels = np.asarray(labels, np.int64)
    self._loader = loader
    self.names = names
    self.class_names = class_names
    self.description = description
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.labels)

  def image(self, i: int) -> np.ndarray:
    i = int(i)
    img = self._cache.get(i)
    if img is None:
      img = self._loader(i)
      with self._lock:
        self._cache[i] = img
    return img


def _decode(data: bytes, name: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"cannot decode image {name!r} ({e}); remove or replace the file") from e


def _by_class(names: list[str], where: str) -> tuple[list[str], np.ndarray, list[str]]:
  """`class/file` paths -> (kept names, labels by alphabetical class index, class names)."""
  names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS) and "/" in n.strip("/"))
  classes = sorted({n.strip("/").split("/")[-2] for n in names})
  if not classes:
    raise DataError(f"{where}: no images in a `<class>/<image file>` layout found")
  index = {c: i for i, c in enumerate(classes)}
  return names, np.array([index[n.strip("/").split("/")[-2]] for n in names]), classes


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


def folder_images(root: str) -> ImageSet:
  """An image folder `root/<class>/<file>` (torchvision ImageFolder layout, alphabetical ids)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root} not found: expected `{root}/<class>/<image>`")
  files = []
  for dirpath, _, fnames in os.walk(root):
    files += [os.path.relpath(os.path.join(dirpath, f), root) for f in fnames]
  names, labels, classes = _by_class([f.replace(os.sep, "/") for f in files], root)

  def load(i):
    p = os.path.join(root, names[i])
    with open(p, "rb") as f:
      return _decode(f.read(), p)
  return ImageSet(labels, load, names, classes, f"folder {root}")


def array_images(images: np.ndarray, labels: np.ndarray, description: str,
                 class_names=None) -> ImageSet:
  images = np.asarray(images)
  return ImageSet(labels, lambda i: images[i], None, class_names, description)


def digits_images(split: str) -> ImageSet:
  """scikit-learn's bundled 8x8 digits (1,797 images, always available): a seeded 75/25 split."""
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


def tfds_images(name: str, split: str, data_dir: Optional[str] = None,
                download: bool = True) -> ImageSet:
  """A tensorflow-datasets data source (random access; prepared with TensorFlow if needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=download)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not available under "
        f"{data_dir or tfds.core.constants.DATA_DIR} and could not be prepared ({type(e).__name__}: "
        f"{e}). Prepare it on a machine with internet access (`tfds build {name}`) and pass "
        f"--config.data.data_dir") from e
  n = len(src)
  labels = np.array([int(src[i]["label"]) for i in range(n)], np.int64)

  def load(i):
    img = np.asarray(src[i]["image"], np.uint8)
    return np.repeat(img, 3, -1) if img.shape[-1] == 1 else img
  return ImageSet(labels, load, None, None, f"tfds {name} ({split})")


def verify_sha256(path: str, manifest: str, key: str) -> None:
  """Checks an archive against MANIFEST.json once (the result is cached beside the archive)."""
  if not os.path.exists(manifest):
    return
  with open(manifest) as f:
    want = json.load(f).get(key, {}).get("sha256")
  if not want:
    return
  stamp = os.path.join(os.path.expanduser("~"), ".cache", "ntkcl_jax", "verified",
                       want + ".ok")
  if os.path.exists(stamp):
    return
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  if h.hexdigest() != want:
    raise DataError(f"{path}: sha256 {h.hexdigest()} does not match {manifest} ({want}); the "
                    "archive is corrupt or was changed: copy it again")
  os.makedirs(os.path.dirname(stamp), exist_ok=True)
  open(stamp, "w").close()
