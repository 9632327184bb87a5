r"""Input-pipeline benchmark: images/s of task-stream batches at 224 px.

    python benchmarks/input_pipeline.py                       # real Imagenette ZIP if present
    python benchmarks/input_pipeline.py --synthetic --size=224 --batch=32 --per_class=30

What is timed: iterating `stream.train_batches` (official RandomResizedCrop + flip, ImageNet
normalisation, float32 NHWC) and `stream.eval_batches('test')` (bicubic resize + centre crop) of
task 0 for a few epochs, one host. Epoch 0 includes JPEG decoding (decoded images are then kept
in memory); later epochs measure augmentation alone; the second test pass reads the cached test
transform. Without ../shared/data it writes synthetic JPEGs (Imagenette-like 224 x ~300 px) to a
temporary ZIP pair of the same layout. Prints a table.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ntkcl_jax import cli  # noqa: E402
from ntkcl_jax import config_files  # noqa: E402
from ntkcl_jax import data as data_lib  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "imagenette")


def synthetic_jpeg_zips(root: str, per_class: int, test_per_class: int) -> str:
  """Writes train.zip / val.zip of smooth random JPEGs (short side 224) in `<class>/<file>`."""
  rng = np.random.RandomState(0)
  d = os.path.join(root, "imagenette")
  os.makedirs(d)
  for fname, n in (("train.zip", per_class), ("val.zip", test_per_class)):
    with zipfile.ZipFile(os.path.join(d, fname), "w", zipfile.ZIP_STORED) as zf:
      for c in range(10):
        for k in range(n):
          small = (rng.rand(14, 19, 3) * 255).astype(np.uint8)
          img = Image.fromarray(small).resize((300, 224), Image.BICUBIC)
          buf = io.BytesIO()
          img.save(buf, "JPEG", quality=85)
          zf.writestr(f"n{c:08d}/{k:04d}.JPEG", buf.getvalue())
  return d


def _time(it) -> tuple[int, float]:
  t, n = time.perf_counter(), 0
  for b in it:
    n += int(b["mask"].sum())
  return n, time.perf_counter() - t


def main(argv=None) -> None:
  cli.run(_main, argv)


def _main(argv) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--per_class", type=int, default=30, help="train images per class")
  p.add_argument("--test_per_class", type=int, default=30)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--prefetch", type=int, default=2)
  p.add_argument("--synthetic", action="store_true", help="synthetic JPEGs even if the ZIPs exist")
  a = p.parse_args(argv)
  bad = [f"--{k}={v}" for k, v in vars(a).items()
         if k in ("size", "batch", "per_class", "test_per_class", "epochs") and v < 1]
  bad += [f"--prefetch={a.prefetch}"] if a.prefetch < 0 else []
  if bad:
    raise cli.InputError(f"{', '.join(bad)}: sizes, counts and epochs must be >= 1 and "
                         "--prefetch >= 0")

  tmp = None
  if a.synthetic or not os.path.isdir(SHARED):
    tmp = tempfile.TemporaryDirectory()
    data_dir, what = synthetic_jpeg_zips(tmp.name, a.per_class, a.test_per_class), "synthetic JPEG"
  else:
    data_dir, what = SHARED, "Imagenette ZIP"
  c = config_files.load_config_file("configs/demo.py")
  c.model.image_size = a.size
  c.model.normalize = "imagenet"
  c.data.data_dir = data_dir
  c.data.init_cls, c.data.increment = 10, 10  # one task with every class
  c.data.max_per_class_train, c.data.max_per_class_test = a.per_class, a.test_per_class
  c.data.train_transform, c.data.prefetch = "official", a.prefetch
  stream = data_lib.build_stream(c)
  rows = []
  for epoch in range(a.epochs):
    n, dt = _time(stream.train_batches(0, epoch, a.batch))
    rows.append((f"train epoch {epoch}" + (" (decode+augment)" if epoch == 0 else " (augment)"),
                 n, dt))
  for k in range(2):
    n, dt = _time(stream.eval_batches("test", stream.tasks[0], a.batch))
    rows.append((f"test pass {k}" + (" (decode+resize)" if k == 0 else " (cached)"), n, dt))
  threads = stream._pool._max_workers  # pylint: disable=protected-access
  print(f"\ninput pipeline: {what} at {a.size} px, batch {a.batch}, prefetch {a.prefetch}, "
        f"{os.cpu_count()} CPU cores, {threads} decode threads")
  print(f"{'phase':34s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
  for name, n, dt in rows:
    print(f"{name:34s} {n:7d} {dt:8.2f} {n / dt:9.1f}")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  main()
