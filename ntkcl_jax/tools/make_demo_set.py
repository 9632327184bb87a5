r"""Builds the demo image set shipped inside the package (ntkcl_jax/data/demo_images/).

    python -m ntkcl_jax.tools.make_demo_set [--shared_data=../shared/data] [--output=DIR] [--check]

The default run (configs/demo.py) draws 30 training and 50 test images per class from the
Imagenette archives in ../shared/data. This keeps exactly those images (the draw of
ntkcl_jax.data.stream, same seeds), downscaled and re-encoded as JPEG, in ZIPs of the same
`<wnid>/<file>` layout, so machines without the archives run the same protocol offline. The
output is byte-for-byte reproducible (fixed ZIP timestamps, order and JPEG settings); `--check`
rebuilds in memory and compares with the files on disk instead of writing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np
from absl import app, flags
from PIL import Image

from ntkcl_jax.configs import demo, dinov2s_real
from ntkcl_jax.data import sources
from ntkcl_jax.data.stream import subsample

FLAGS = flags.FLAGS
DEFAULT_OUTPUT = dinov2s_real.BUNDLED_DATA
JPEG = {"quality": 90, "subsampling": 0, "optimize": False}  # 4:4:4, no per-file Huffman tables
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry timestamps: same bytes on every build
# (archive, its per-class cap in the demo config, the stream's draw salt for that split)
SPLITS = (("train.zip", "max_per_class_train", 11),
          ("val.zip", "max_per_class_test", 12))


def short_sides(image_size: int) -> dict[str, int]:
  """Short side kept per split: test images at exactly what the test transform resizes to
  (round(S * 256/224), so its resize is the identity); training images at 2 S, room for the
  random resized crops (scale 0.05 to 1) without upsampling most of them."""
  return {"train.zip": 2 * image_size, "val.zip": int(round(image_size * 256 / 224))}


def resize_short(img: np.ndarray, short: int) -> Image.Image:
  """Short side to `short` px, bicubic, with the rounding of the test transform."""
  im = Image.fromarray(img)
  w, h = im.size
  size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  return im.resize(size, Image.BICUBIC)


def build_zip(src_path: str, per_class: int, salt: int, short: int) -> tuple[bytes, int]:
  """(ZIP bytes, image count): the images of `src_path` the stream draws, downscaled."""
  s = sources.zip_images(src_path)
  idx = subsample(s.labels, per_class, salt)
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
    for i in sorted(idx, key=lambda k: s.names[k]):
      jpg = io.BytesIO()
      resize_short(s.image(i), short).save(jpg, "JPEG", **JPEG)  # RGB: grayscale sources too
      info = zipfile.ZipInfo(s.names[i], ZIP_TIME)  # the archive's `<wnid>/<file>.JPEG` name
      info.external_attr = 0o644 << 16
      zf.writestr(info, jpg.getvalue())
  return buf.getvalue(), len(idx)


def build(shared_data: str) -> dict[str, bytes]:
  """Relative path -> file bytes of the whole demo set (ZIPs and MANIFEST.json)."""
  c = demo.get_config("source=zip")
  folder = os.path.join(shared_data, "imagenette")
  with open(os.path.join(shared_data, "MANIFEST.json")) as f:
    upstream = json.load(f)
  sides = short_sides(int(c.model.image_size))
  files, manifest = {}, {}
  for name, cap_key, salt in SPLITS:
    src = os.path.join(folder, name)
    sources.verify_sha256(src, os.path.join(shared_data, "MANIFEST.json"), f"imagenette/{name}")
    per_class = int(c.data[cap_key])
    blob, n = build_zip(src, per_class, salt, sides[name])
    files[f"imagenette/{name}"] = blob
    manifest[f"imagenette/{name}"] = {
        "images": n, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
        "source": f"../shared/data/imagenette/{name} "
                  f"({upstream[f'imagenette/{name}']['source']}, sha256 "
                  f"{upstream[f'imagenette/{name}']['sha256'][:12]}...)",
        "selection": f"the {per_class} images per class the demo draws (data.{cap_key}="
                     f"{per_class}, ntkcl_jax.data.stream draw salt {salt}), short side "
                     f"{sides[name]} px (bicubic), JPEG quality {JPEG['quality']} 4:4:4"}
  files["MANIFEST.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
  return files


def main(_):
  files = build(FLAGS.shared_data)
  if FLAGS.check:
    stale = [p for p, b in files.items() if not os.path.exists(os.path.join(FLAGS.output, p))
             or open(os.path.join(FLAGS.output, p), "rb").read() != b]
    if stale:
      raise SystemExit(f"{FLAGS.output}: {stale} differ from a fresh build; rerun without --check")
    print(f"{FLAGS.output}: identical to a fresh build")
    return
  for p, b in files.items():
    os.makedirs(os.path.dirname(os.path.join(FLAGS.output, p)), exist_ok=True)
    with open(os.path.join(FLAGS.output, p), "wb") as f:
      f.write(b)
    print(f"{os.path.join(FLAGS.output, p)}: {len(b) / 2 ** 20:.2f} MB")


def _define_flags() -> None:
  """Registers this CLI's flags; only when run as a program, so importing the module
  next to other CLIs (tests, notebooks) never clashes on a flag name."""
  flags.DEFINE_string("shared_data", dinov2s_real.SHARED_DATA,
                      "folder with imagenette/{train,val}.zip and MANIFEST.json")
  flags.DEFINE_string("output", DEFAULT_OUTPUT, "where to write the demo set")
  flags.DEFINE_bool("check", False, "compare a fresh build with --output instead of writing")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
