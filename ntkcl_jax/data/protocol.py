"""Class-incremental protocol: class order and task splits (docs/method.md §3.2).

Class order as the official code draws it: `np.random.seed(seed); np.random.permutation(C)` (the
legacy RandomState, stable across NumPy versions). Original class `order[k]` becomes new label k.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def class_order(num_classes: int, mode: str = "seed", seed: int = 0,
                explicit: Sequence[int] = ()) -> np.ndarray:
  """Original class ids in training order."""
  if mode == "seed":
    return np.random.RandomState(seed).permutation(num_classes)
  if mode == "natural":
    return np.arange(num_classes)
  if mode == "explicit":
    order = np.asarray(list(explicit), np.int64)
    if sorted(order.tolist()) != list(range(num_classes)):
      raise ValueError(f"data.explicit_order must be a permutation of 0..{num_classes - 1}, got "
                       f"{order.tolist()}")
    return order
  raise ValueError(f"data.class_order={mode!r}: use 'seed', 'natural' or 'explicit'")


def task_splits(num_classes: int, init_cls: int, increment: int) -> list[list[int]]:
  """New labels of each task: init_cls first, then `increment` each, a smaller remainder last."""
  if min(num_classes, init_cls, increment) <= 0 or init_cls > num_classes:
    raise ValueError(f"impossible split: num_classes={num_classes}, init_cls={init_cls}, "
                     f"increment={increment} (need 0 < init_cls <= num_classes, increment > 0)")
  bounds = [0, init_cls]
  while bounds[-1] < num_classes:
    bounds.append(min(num_classes, bounds[-1] + increment))
  return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def num_tasks(config) -> int:
  """How many tasks config.data's split has: init_cls first, then one per `increment` (the last
  may be smaller), as task_splits draws them."""
  d = config.data
  rest = d.num_classes - d.init_cls
  return 1 + rest // d.increment + (1 if rest % d.increment else 0)


def remap(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
  """Original labels -> new labels (position of each label in `order`)."""
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return inverse[np.asarray(labels)]
