"""Class-incremental data: `build_stream(config, process_index, process_count)` -> TaskStream.

`config.data.name` picks the dataset (ntkcl_jax/data/benchmarks.py lists them) and
`config.data.source` where its images come from: `folder` (official `{train,test}/<class>/`
layout under data_dir), `zip` (ZIP archives: the ../shared/data ones, or the demo images shipped
in the package, `imagenette_demo`), `tfds` (tensorflow-datasets), `mock` (tfds under
`tfds.testing.mock_data`: tests), `digits`, `synthetic`. The description returned with the splits
names the source (the launcher prints it). `check_paths(config)` checks the folders and archives
a config reads before anything is listed, read or downloaded (the launcher's first checks).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from ntkcl_jax.data import benchmarks, sources
from ntkcl_jax.data.sources import DataError
from ntkcl_jax.data.stream import TaskStream

__all__ = ["build_stream", "check_paths", "load_splits", "TaskStream", "DataError"]

SOURCES = ("folder", "zip", "tfds", "mock", "digits", "synthetic")


def check_same_classes(train, test, where: str) -> None:
  """Train and test class folders must be the same set, or class ids would not agree."""
  if train.class_names != test.class_names:
    a, b = set(train.class_names), set(test.class_names)
    raise DataError(f"{where}: train and test have different class folders (only in train: "
                    f"{sorted(a - b)}, only in test: {sorted(b - a)}); every class needs a folder "
                    f"with images in both splits")


def _zip_path(config, ds, f: str) -> str:
  """data_dir/f, one of the dataset's ZIP archives; missing: one line saying where it goes."""
  d = config.data
  path = os.path.join(d.data_dir, f)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {d.name} expects {list(ds.zip_files)} in data.data_dir="
        f"{d.data_dir!r} " + ("(the demo set shipped in the package: rebuild it with `python "
                              "-m ntkcl_jax.tools.make_demo_set` or reinstall)" if ds.bundled
                              else "(the ../shared/data archives)"))
  return path


def check_paths(config) -> None:
  """The dataset name, source, class count and the paths config.data reads (the image folders
  of `folder`, the archives of `zip`) are checked without listing or reading anything, so a
  wrong path is one line before any work. tfds data is checked when it is opened (a dataset
  that is not prepared there is downloaded, after a reachability check)."""
  d = config.data
  ds = benchmarks.get(d.name)
  if d.source not in SOURCES:
    raise ValueError(f"data.source={d.source!r}; one of {SOURCES}")
  benchmarks.check_num_classes(config)
  if d.source == "folder":
    benchmarks.folder_root(d.data_dir, ds, d.name)
  elif d.source == "zip":
    if not ds.zip_files:
      raise ValueError(f"{d.name} has no ZIP archives; use source 'folder' or 'tfds'")
    for f in ds.zip_files:
      _zip_path(config, ds, f)
  elif d.source in ("tfds", "mock") and not ds.tfds:
    raise ValueError(f"{d.name} has no tensorflow-datasets builder ({ds.note or 'use folders'})")


def load_splits(config, process_index: int = 0, process_count: int = 1, allgather=None):
  """(train ImageSet, test ImageSet, description) for config.data; folders and tfds labels are
  listed by all hosts together when `allgather` is given (sources.folder_images, tfds_images)."""
  check_paths(config)
  d = config.data
  ds = benchmarks.get(d.name)
  src = d.source
  if src == "synthetic":
    per_train, per_test = (d.max_per_class_train or 12), (d.max_per_class_test or 8)
    size = config.model.image_size
    return (sources.synthetic_images("train", d.num_classes, size, per_train),
            sources.synthetic_images("test", d.num_classes, size, per_test),
            f"synthetic class templates ({d.num_classes} classes)")
  if src == "digits":
    return (sources.digits_images("train"), sources.digits_images("test"),
            "scikit-learn bundled digits (8x8, upsampled)")
  if src == "zip":
    sets, verified = [], []
    for f in ds.zip_files:
      path = _zip_path(config, ds, f)
      key = f"{os.path.basename(os.path.normpath(d.data_dir))}/{f}"
      verified.append(sources.verify_sha256(
          path, os.path.join(os.path.dirname(os.path.normpath(d.data_dir)), "MANIFEST.json"), key))
      sets.append(sources.zip_images(path))
    check_same_classes(sets[0], sets[1], d.data_dir)
    check = "sha256 verified" if all(verified) else "no MANIFEST.json entry: sha256 not checked"
    what = ("source=bundled: the demo images shipped with the package, downscaled"
            if ds.bundled else "source=zip: ZIP archives")
    return sets[0], sets[1], f"{d.name} from {d.data_dir} ({what}, {check})"
  if src == "folder":
    root = benchmarks.folder_root(d.data_dir, ds, d.name)
    train, test = (sources.folder_images(os.path.join(root, split), process_index, process_count,
                                         allgather) for split in ("train", "test"))
    check_same_classes(train, test, root)
    shared = (f"; each of {train.listed_by} hosts listed its share of the class folders"
              if train.listed_by > 1 else "")
    return train, test, f"{d.name} folders at {root}{shared}"
  # tfds / mock
  ctx = contextlib.nullcontext()
  if src == "mock":
    # lazy: tensorflow-datasets is heavy and only mock data needs it here
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    ctx = tfds.testing.mock_data(num_examples=max(4 * d.num_classes, 32))
  with ctx:
    train, test = (sources.tfds_images(ds.tfds, split, d.data_dir, skip_decoding=src != "mock",
                                       process_index=process_index,
                                       process_count=process_count, allgather=allgather)
                   for split in ds.tfds_splits)
    if src == "mock":  # mock sources are lazy: materialise inside the context
      for s in (train, test):
        for i in range(len(s)):
          s.image(i)
  shared = (f"; each of {train.listed_by} hosts read the labels of its share"
            if train.listed_by > 1 else "")
  return train, test, (f"source=tfds: {ds.tfds}" + (" (mock data)" if src == "mock" else "")
                       + shared)


def build_stream(config, process_index: int = 0, process_count: int = 1) -> TaskStream:
  """The task stream of config.data for one host of `process_count`. When these are the running
  JAX processes (a multi-host run), the hosts share the listing of folder and tfds datasets."""
  allgather = None
  if process_count > 1:
    import jax  # pylint: disable=g-import-not-at-top  # lazy: single-host users need no JAX here
    if jax.process_count() == process_count:
      from ntkcl_jax import sharding  # pylint: disable=g-import-not-at-top
      allgather = sharding.process_allgather_json
  train, test, description = load_splits(config, process_index, process_count, allgather)
  if config.data.source == "mock":  # mock examples carry random labels: pin the class count
    c = config.data.num_classes
    for s in (train, test):
      s.labels = np.arange(len(s)) % c
  return TaskStream(config, train, test, process_index, process_count, description)

