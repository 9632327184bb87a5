r"""Input-pipeline benchmark: images/s of task-stream batches at 224 px.

    python -m benchmarks.input_pipeline                       # real Imagenette ZIP if present
    python -m benchmarks.input_pipeline --synthetic --size=224 --batch=32 --per_class=30

What is timed: iterating `stream.train_batches` (official RandomResizedCrop + flip, ImageNet
normalisation, float32 NHWC) and `stream.eval_batches('test')` (bicubic resize + centre crop) of
task 0 for a few epochs, one host. Epoch 0 includes JPEG decoding (decoded images are then kept
in memory); later epochs measure augmentation alone; the second test pass reads the cached test
transform. Without ../shared/data it writes synthetic JPEGs (Imagenette-like 224 x ~300 px) to a
temporary ZIP pair of the same layout. Prints a table.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import zipfile

from absl import flags
import numpy as np
from PIL import Image

from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def define_flags(fv) -> None:
  flags.DEFINE_integer("size", 224, "image size (px)", flag_values=fv)
  flags.DEFINE_integer("batch", 32, "images per batch", flag_values=fv)
  flags.DEFINE_integer("per_class", 30, "train images per class", flag_values=fv)
  flags.DEFINE_integer("test_per_class", 30, "test images per class", flag_values=fv)
  flags.DEFINE_integer("epochs", 3, "train epochs timed", flag_values=fv)
  flags.DEFINE_integer("prefetch", 2, "config.data.prefetch", flag_values=fv)
  flags.DEFINE_bool("synthetic", False, "synthetic JPEGs even if the ZIPs exist", flag_values=fv)


def _main(fv) -> int:
  bad = [f"--{k}={getattr(fv, k)}" for k in ("size", "batch", "per_class", "test_per_class",
                                             "epochs") if getattr(fv, k) < 1]
  bad += [f"--prefetch={fv.prefetch}"] if fv.prefetch < 0 else []
  if bad:
    raise cli.InputError(f"{', '.join(bad)}: sizes, counts and epochs must be >= 1 and "
                         "--prefetch >= 0")

  tmp = None
  if fv.synthetic or not os.path.isdir(SHARED):
    tmp = tempfile.TemporaryDirectory()
    data_dir = synthetic_jpeg_zips(tmp.name, fv.per_class, fv.test_per_class)
    what = "synthetic JPEG"
  else:
    data_dir, what = SHARED, "Imagenette ZIP"
  c = config_files.load_config_file("configs/demo.py")
  c.model.image_size = fv.size
  c.model.normalize = "imagenet"
  c.data.data_dir = data_dir
  c.data.init_cls, c.data.increment = 10, 10  # one task with every class
  c.data.max_per_class_train, c.data.max_per_class_test = fv.per_class, fv.test_per_class
  c.data.train_transform, c.data.prefetch = "official", fv.prefetch
  stream = data_lib.build_stream(c)
  rows = []
  for epoch in range(fv.epochs):
    n, dt = _time(stream.train_batches(0, epoch, fv.batch))
    rows.append((f"train epoch {epoch}" + (" (decode+augment)" if epoch == 0 else " (augment)"),
                 n, dt))
  for k in range(2):
    n, dt = _time(stream.eval_batches("test", stream.tasks[0], fv.batch))
    rows.append((f"test pass {k}" + (" (decode+resize)" if k == 0 else " (cached)"), n, dt))
  threads = stream._pool._max_workers  # pylint: disable=protected-access
  print(f"\ninput pipeline: {what} at {fv.size} px, batch {fv.batch}, prefetch {fv.prefetch}, "
        f"{os.cpu_count()} CPU cores, {threads} decode threads")
  print(f"{'phase':34s} {'images':>7s} {'seconds':>8s} {'images/s':>9s}")
  for name, n, dt in rows:
    print(f"{name:34s} {n:7d} {dt:8.2f} {n / dt:9.1f}")
  if tmp is not None:
    tmp.cleanup()
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
