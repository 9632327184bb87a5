"""What a config's protocol will train on, without decoding images (used by tools/show_split).

Class order and task splits need only the class count (docs/method.md §3.2). Image counts
come, cheapest first, from the registry's known per-class counts (balanced sets, docs/method.md §5.2),
from listing archive/folder file names (no image is read), or from building the stream (small
in-memory sets: synthetic, digits, mock). `max_per_class_*` subsampling is applied exactly as the
stream applies it.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ntkcl_jax import data as data_lib
from ntkcl_jax.data import benchmarks, protocol, sources, stream


def _labels_without_images(config) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
  """(train labels, test labels, how) from file names, or None when the data is not listable."""
  d = config.data
  ds = benchmarks.get(d.name)
  if d.source == "zip" and ds.zip_files:
    paths = [os.path.join(d.data_dir, f) for f in ds.zip_files]
    if not all(os.path.exists(p) for p in paths):
      return None
    (train, train_cls), (test, test_cls) = (sources.zip_labels(p) for p in paths)
    how = "listed from the ZIP directories (no image decoded)"
  elif d.source == "folder":
    try:
      root = benchmarks.folder_root(d.data_dir, ds, d.name)
    except FileNotFoundError:
      return None
    (train, train_cls), (test, test_cls) = (sources.folder_labels(os.path.join(root, split))
                                            for split in ("train", "test"))
    how = f"listed from the folders at {root} (no image decoded)"
  else:
    return None
  if train_cls != test_cls:
    raise sources.DataError(f"{d.data_dir}: train and test have different class folders "
                            f"({sorted(set(train_cls) ^ set(test_cls))} are in one only)")
  return train, test, how


def _task_counts(labels: np.ndarray, order: np.ndarray, tasks, per_class_max: int,
                 salt) -> list[int]:
  new = protocol.remap(labels, order)[stream.subsample(labels, per_class_max, salt)]
  return [int(np.isin(new, t).sum()) for t in tasks]


def split_summary(config) -> dict:
  """JSON-able description of config.data's protocol: class order, tasks, image counts."""
  d = config.data
  ds = benchmarks.get(d.name)
  benchmarks.check_num_classes(config)
  c = int(d.num_classes)
  order = protocol.class_order(c, d.class_order, int(config.seed), d.explicit_order)
  tasks = protocol.task_splits(c, d.init_cls, d.increment)
  out = {"dataset": d.name, "source": d.source, "data_dir": d.data_dir, "seed": int(config.seed),
         "num_classes": c, "num_tasks": len(tasks),
         "class_order": [int(x) for x in order],
         "task_classes": [[int(order[k]) for k in t] for t in tasks],
         "task_new_labels": tasks}
  listed = _labels_without_images(config)
  caps = (int(d.max_per_class_train), int(d.max_per_class_test))
  if listed is not None:
    train, test, how = listed
    counts = {"train": _task_counts(train, order, tasks, caps[0],
                                    stream.subsample_salt(config, "train")),
              "test": _task_counts(test, order, tasks, caps[1],
                                   stream.subsample_salt(config, "test"))}
  elif ds.per_class and d.source in ("tfds", "folder", "zip"):
    counts = {split: [len(t) * (min(n, cap) if cap else n) for t in tasks]
              for split, n, cap in zip(("train", "test"), ds.per_class, caps)}
    how = ("known per-class counts of the benchmark (docs/method.md §5.2); no data was "
           "read")
  elif d.source in ("synthetic", "digits", "mock"):
    built = data_lib.build_stream(config)
    counts, how = dict(built.counts), built.description
  else:
    counts = {"train": [None] * len(tasks), "test": [None] * len(tasks)}
    how = ("per-task counts unknown without the data (no per-class counts on record)" +
           (f"; benchmark totals train/test = {ds.counts[0]}/{ds.counts[1]}" if ds.counts
            else ""))
  out["counts"] = counts
  out["totals"] = {k: (sum(v) if None not in v else (ds.counts[i] if ds.counts else None))
                   for i, (k, v) in enumerate(counts.items())}
  out["counts_from"] = how
  return out
