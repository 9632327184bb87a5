"""The class-incremental task stream the learner consumes (contract in docs/design.md).

Deterministic and resumable without saved iterator buffers: the shuffle of a task's training
images depends only on (seed, task, epoch), augmentation only on (seed, epoch, example index),
so `train_batches(task, epoch, B, start_batch=k)` yields exactly batches k, k+1, ... of the
uninterrupted iterator, on any number of hosts. Each host materialises only its rows
[p*B/P, (p+1)*B/P) of every global batch. Partial last batches (kept, as the official loader
does) are padded by repeating a real example and masked; so are eval batches whose size the
number of hosts does not divide (the learner pads them further to the devices of the mesh).

Images are uint8, as the transforms leave them (every crop and resize ends in PIL's uint8):
/255 and `model.normalize` happen on the device (`normalization.model_input`, bit-identical to
doing them here), so a batch crosses to the device at a quarter of the float32 size.
`prefetch_to_device` keeps the next batches' transfers in flight while a step runs.

Why plain numpy + threads rather than grain or tf.data: there is no TensorFlow in the data path,
grain's MapDataset would give the same random access but its iterator state is
replaced here by the three integers the launcher already checkpoints, and the decoded offline
sets fit in memory; a thread pool (PIL releases the GIL) plus a prefetching thread keep the
pipeline ahead of the train step (benchmarks/input_pipeline.py measures it). The pool has
`train.reader_threads` threads (0: one per CPU this process may use, at most MAX_READER_THREADS);
the thread count never changes a batch, only how fast it is ready.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import os
import queue
import threading
from typing import Callable, Iterable, Iterator

import numpy as np

from ntkcl_jax import normalization
from ntkcl_jax.data import protocol, sources, transforms

MAX_READER_THREADS = 32  # decoding threads beyond this rarely help and each holds buffers


def reader_threads(asked: int = 0) -> int:
  """Threads of the stream's image pool: `asked` if > 0, else one per CPU this process may
  run on (its affinity, which containers and schedulers narrow), capped at MAX_READER_THREADS."""
  if asked > 0:
    return int(asked)
  try:
    cpus = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cpus = os.cpu_count() or 1
  return max(1, min(MAX_READER_THREADS, cpus))


def subsample_salt(config, split: str) -> tuple[int, ...]:
  """The seed material of a split's subsample: fixed per split, or also the run's seed when
  `data.subsample_per_seed` (so seeds differ in their images, not only in order and init)."""
  salt = {"train": 11, "test": 12}[split]
  return (salt, int(config.seed)) if config.data.subsample_per_seed else (salt,)


def subsample(labels: np.ndarray, per_class: int, salt) -> np.ndarray:
  """Indices keeping at most `per_class` images of each class, a draw fixed by `salt` (an int or
  a tuple of ints, see `subsample_salt`)."""
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if per_class and len(idx) > per_class:
      rs = np.random.RandomState([*np.atleast_1d(salt).tolist(), int(c)])
      idx = np.sort(rs.choice(idx, per_class, replace=False))
    keep.append(idx)
  return np.sort(np.concatenate(keep))


class TaskStream:
  """Task stream over a train and a test ImageSet (see module docstring)."""

  def __init__(self, config, train: sources.ImageSet, test: sources.ImageSet,
               process_index: int = 0, process_count: int = 1, description: str = ""):
    d = config.data
    self.config = config
    self.seed = int(config.seed)
    self.size = int(config.model.image_size)
    self.normalize = config.model.normalize
    self.augment = d.train_transform
    if d.train_transform not in ("official", "none"):
      raise ValueError(f"data.train_transform={d.train_transform!r}: use 'official' or 'none'")
    self.pi, self.pc = process_index, process_count
    self.prefetch = int(d.prefetch)
    self.num_classes = int(d.num_classes)
    found = int(max(train.labels.max(), test.labels.max())) + 1
    if found != self.num_classes:
      raise sources.DataError(
          f"{d.name}: the data has {found} classes but data.num_classes={self.num_classes}; "
          f"fix data.num_classes or point data.data_dir at the right dataset")
    for split, s in (("train", train), ("test", test)):
      counts = np.bincount(s.labels, minlength=self.num_classes)
      if (counts == 0).any():
        empty = np.flatnonzero(counts == 0).tolist()
        names = [s.class_names[c] for c in empty] if s.class_names else empty
        raise sources.DataError(f"{d.name}: class(es) {names} have no {split} images; every "
                                f"class needs images in both splits")
    self.class_order = protocol.class_order(self.num_classes, d.class_order, self.seed,
                                            d.explicit_order)
    self.tasks = protocol.task_splits(self.num_classes, d.init_cls, d.increment)
    self.num_tasks = len(self.tasks)
    self.train_set, self.test_set = train, test
    self.train_idx = subsample(train.labels, d.max_per_class_train,
                               subsample_salt(config, "train"))
    self.test_idx = subsample(test.labels, d.max_per_class_test,
                              subsample_salt(config, "test"))
    self.train_new = protocol.remap(train.labels, self.class_order)  # new label per image
    self.test_new = protocol.remap(test.labels, self.class_order)
    self.description = description
    self.counts = {"train": [int(np.isin(self.train_new[self.train_idx], t).sum())
                             for t in self.tasks],
                   "test": [int(np.isin(self.test_new[self.test_idx], t).sum())
                            for t in self.tasks]}
    self.reader_threads = reader_threads(int(config.train.get("reader_threads", 0)))
    self._pool = concurrent.futures.ThreadPoolExecutor(self.reader_threads)
    self._test_cache: dict[tuple[str, int], np.ndarray] = {}
    self._test_cache_left = sources.cache_budget_bytes()

  # -- indices --------------------------------------------------------------------------------
  def _task_train_indices(self, task: int) -> np.ndarray:
    idx = self.train_idx[np.isin(self.train_new[self.train_idx], self.tasks[task])]
    return idx

  def num_train_images(self, task: int) -> int:
    """Training images of the task (each epoch); batch b holds min(B, n - b*B) real rows."""
    return len(self._task_train_indices(task))

  def num_train_batches(self, task: int, batch_size: int) -> int:
    return math.ceil(self.num_train_images(task) / batch_size)

  def epoch_order(self, task: int, epoch: int) -> np.ndarray:
    """The task's training image indices in the order of this epoch."""
    idx = self._task_train_indices(task)
    return idx[np.random.default_rng([self.seed, task, epoch, 0x5F]).permutation(len(idx))]

  # -- per-image transforms --------------------------------------------------------------------
  def _train_image(self, i: int, epoch: int) -> np.ndarray:
    img = self.train_set.image(i)
    if self.augment == "official":
      return transforms.train_transform_uint8(img, self.size,
                                              transforms.example_rng(self.seed, epoch, i))
    return transforms.resize_only_uint8(img, self.size)

  def _eval_image(self, split: str, i: int) -> np.ndarray:
    """Test-transformed uint8 image; deterministic, so kept within the cache budget."""
    key = (split, int(i))
    out = self._test_cache.get(key)
    if out is None:
      s = self.train_set if split == "proto" else self.test_set
      img = s.image(i)
      out = (transforms.test_transform_uint8(img, self.size) if self.augment == "official"
             else transforms.resize_only_uint8(img, self.size))
      if out.nbytes <= self._test_cache_left:
        self._test_cache[key] = out
        self._test_cache_left -= out.nbytes
    return out

  # -- batches ---------------------------------------------------------------------------------
  def _host_rows(self, rows: np.ndarray, batch_size: int):
    if batch_size % self.pc:
      raise ValueError(f"batch size {batch_size} is not divisible by {self.pc} processes")
    mask = np.zeros(batch_size, bool)
    mask[:len(rows)] = True
    rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    per = batch_size // self.pc
    sl = slice(self.pi * per, (self.pi + 1) * per)
    return rows[sl], mask[sl]

  def model_input(self, images):
    """A batch's uint8 images -> the model's float32 input (`model.normalize`), numpy or jax."""
    return normalization.model_input(images, self.normalize)

  def _make(self, rows, mask, labels_of, image_fn) -> dict:
    images = np.stack(list(self._pool.map(image_fn, rows)))
    if images.dtype != np.uint8:
      raise TypeError(f"image transforms gave {images.dtype}; the stream sends uint8")
    return {"image": images, "label": labels_of[rows].astype(np.int32), "mask": mask}

  def _prefetched(self, jobs) -> Iterator[dict]:
    """Runs the batch builders one or more ahead of the consumer (data.prefetch)."""
    if self.prefetch <= 0:
      for job in jobs:
        yield job()
      return
    q: queue.Queue = queue.Queue(self.prefetch)
    stop = threading.Event()

    def put(item) -> bool:  # gives up when the consumer has gone (no thread left blocked)
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def worker():
      try:
        for job in jobs:
          if stop.is_set() or not put(("ok", job())):
            return
        put(("end", None))
      except BaseException as e:  # pylint: disable=broad-except
        put(("err", e))
    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
      while True:
        kind, item = q.get()
        if kind == "end":
          return
        if kind == "err":
          raise item
        yield item
    finally:
      stop.set()

  def train_batches(self, task: int, epoch: int, batch_size: int, start_batch: int = 0):
    """Host-local training batches k = start_batch, ... of (task, epoch)."""
    order = self.epoch_order(task, epoch)
    n = math.ceil(len(order) / batch_size)
    if not 0 <= start_batch <= n:
      raise ValueError(f"start_batch={start_batch} outside [0, {n}] for task {task} "
                       f"(batch size {batch_size})")

    def job(b):
      rows, mask = self._host_rows(order[b * batch_size:(b + 1) * batch_size], batch_size)
      return self._make(rows, mask, self.train_new, lambda i: self._train_image(i, epoch))

    def batches_from(k):
      return self._prefetched(lambda b=b: job(b) for b in range(k, n))
    return _Resumable(batches_from, task, epoch, start_batch)

  def eval_batches(self, split: str, classes, batch_size: int):
    """'test': test images of these new labels; 'proto': their training images, test transform.
    Any batch size: batch b holds images [b*B, (b+1)*B), its rows padded (masked) to a multiple
    of the number of hosts."""
    if split not in ("test", "proto"):
      raise ValueError(f"eval split {split!r}: use 'test' or 'proto'")
    idx, new = ((self.test_idx, self.test_new) if split == "test" else
                (self.train_idx, self.train_new))
    idx = idx[np.isin(new[idx], list(classes))]
    n = math.ceil(len(idx) / batch_size)
    padded = -(-batch_size // self.pc) * self.pc

    def job(b):
      rows, mask = self._host_rows(idx[b * batch_size:(b + 1) * batch_size], padded)
      return self._make(rows, mask, new, lambda i: self._eval_image(split, i))
    return self._prefetched(lambda b=b: job(b) for b in range(n))


def prefetch_to_device(batches: Iterable[dict], put: Callable[[dict], dict],
                       size: int = 2) -> Iterator[dict]:
  """Yields `put(batch)` (e.g. `Learner.device_batch`: sharded global arrays) for each batch,
  `size` batches ahead, so the next batches' host-to-device copies run while the current step
  does (flax.jax_utils.prefetch_to_device, for global arrays split over a mesh)."""
  it = iter(batches)
  ahead: collections.deque = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(it, n):
      ahead.append(put(batch))
  try:
    enqueue(max(1, size))
    while ahead:
      yield ahead.popleft()
      enqueue(1)
  finally:
    close = getattr(it, "close", None)
    if close:
      close()


class _Resumable:
  """An iterator of train batches with a grain-style state {task, epoch, next_batch}."""

  def __init__(self, batches_from, task, epoch, start):
    self._batches_from = batches_from
    self._it = batches_from(start)
    self._state = {"task": task, "epoch": epoch, "next_batch": start}

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._state["next_batch"] += 1
    return batch

  def close(self) -> None:
    """Stops the prefetching thread behind this iterator (also done when it is collected)."""
    close = getattr(self._it, "close", None)
    if close:
      close()

  def get_state(self) -> dict:
    """Pass to `set_state`, or to `train_batches(task, epoch, B, start_batch=s['next_batch'])`."""
    return dict(self._state)

  def set_state(self, state: dict) -> None:
    """Repositions this iterator at `state['next_batch']` (same task and epoch only)."""
    if (state.get("task"), state.get("epoch")) != (self._state["task"], self._state["epoch"]):
      raise ValueError(f"iterator state {state} belongs to another (task, epoch) than "
                       f"{self._state}; call stream.train_batches for that task and epoch")
    self.close()
    self._it = self._batches_from(int(state["next_batch"]))
    self._state = dict(state)
