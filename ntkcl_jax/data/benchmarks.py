"""What each dataset name means: classes, where its images come from, known split counts.

The nine NTK-CL benchmarks (docs/method.md §5.2) read the official `{train,test}/<class>/`
folders (ImageFolder order = alphabetical class index), or a tensorflow-datasets builder where one
exists. Offline sets: the ../shared/data archives, the demo images shipped in the package
(`imagenette_demo`), scikit-learn digits, synthetic templates.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from etils import epath

from ntkcl_jax.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  num_classes: int
  folder: Optional[str] = None          # official folder name under data_dir
  tfds: Optional[str] = None            # tfds builder name
  tfds_splits: tuple = ("train", "test")
  zip_files: Optional[tuple] = None     # (train, test) archive names under data_dir
  bundled: bool = False                 # ships inside the package (data/demo_images)
  counts: Optional[tuple] = None        # (train, test) images, when known
  per_class: Optional[tuple] = None     # (train, test) images of EVERY class, when balanced
  note: str = ""


DATASETS = {
    "cifar100": Dataset(100, folder="cifar100", tfds="cifar100", counts=(50000, 10000),
                        per_class=(500, 100)),
    "imagenet_r": Dataset(200, folder="imagenet-r", tfds="imagenet_r",
                          tfds_splits=("test[:80%]", "test[80%:]"), counts=(24000, 6000),
                          note="tfds has one split; the official 24,000/6,000 split ships as "
                               "folders"),
    "imagenet_a": Dataset(200, folder="imagenet-a", tfds="imagenet_a",
                          tfds_splits=("test[:80%]", "test[80%:]"), counts=(5981, 1519)),
    "domainnet": Dataset(345, folder="domainnet", tfds="domainnet/real",
                         note="the official split lists live on the authors' machine; use "
                              "`domainnet/{train,test}/<class>/` folders"),
    "oxford_pets": Dataset(37, folder="OxfordPets", tfds="oxford_iiit_pet",
                           counts=(3680, 3669)),
    "eurosat": Dataset(10, folder="EuroSAT", tfds="eurosat/rgb",
                       tfds_splits=("train[:80%]", "train[80%:]")),
    "plantvillage": Dataset(15, folder="PlantVillage",
                            note="the official 15-class version differs from tfds plant_village "
                                 "(38 classes): folders only"),
    "vtab": Dataset(50, folder="VTAB"),
    "kvasir": Dataset(8, folder="Kvasir"),
    "imagenette_zip": Dataset(10, zip_files=("train.zip", "val.zip"), counts=(3000, 3925)),
    "imagenette_demo": Dataset(10, zip_files=("train.zip", "val.zip"), counts=(300, 500),
                               per_class=(30, 50), bundled=True,
                               note="the default demo's images, downscaled, shipped with the "
                                    "package (ntkcl_jax/data/demo_images/README.md)"),
    "cifar10_zip": Dataset(10, zip_files=("train.zip", "test.zip"), counts=(10000, 10000),
                           per_class=(1000, 1000)),
    "imagenette/160px": Dataset(10, tfds="imagenette/160px", tfds_splits=("train", "validation"),
                                counts=(9469, 3925)),
    "cifar10": Dataset(10, tfds="cifar10", counts=(50000, 10000), per_class=(5000, 1000)),
    "digits": Dataset(10, counts=(1347, 450)),
    "synthetic": Dataset(0),  # any number of classes
}


def get(name: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r} (data.name); known: {sorted(DATASETS)}")
  return DATASETS[name]


def folder_root(data_dir: str, ds: Dataset, name: str) -> str:
  """The folder holding `train/` and `test/` class folders: data_dir/<folder> or data_dir."""
  cands = [os.path.join(data_dir, ds.folder or name), data_dir]
  for c in cands:  # local or remote (gs://) folders
    if all(epath.Path(os.path.join(c, split)).is_dir() for split in ("train", "test")):
      return c
  raise FileNotFoundError(
      f"{name}: no image folders found. Expected `{cands[0]}/train/<class>/<image>` and "
      f"`{cands[0]}/test/<class>/<image>` ({ds.num_classes} class folders each; the layout the "
      f"official NTK-CL code reads). Set --config.data.data_dir to the folder that contains "
      f"`{ds.folder or name}/`" + (f" ({ds.note})" if ds.note else ""))


def check_num_classes(config) -> None:
  """data.num_classes must be the benchmark's class count (synthetic: any)."""
  ds = get(config.data.name)
  if ds.num_classes and int(config.data.num_classes) != ds.num_classes:
    raise DataError(f"data.num_classes={config.data.num_classes} but {config.data.name} has "
                    f"{ds.num_classes} classes; set --config.data.num_classes={ds.num_classes}")
