"""The official NTK-CL image transforms (docs/method.md §5.1), written once, for any size.

Train: RandomResizedCrop(S, scale (0.05, 1), ratio (3/4, 4/3), bilinear) then horizontal flip
p=0.5 (torchvision's sampling procedure). Test: resize the short side to round(S * 256 / 224)
(bicubic), centre crop S. Random choices come from a generator seeded with (seed, epoch,
example index), so they do not depend on batch size, host count or where a run resumed.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

SCALE = (0.05, 1.0)
RATIO = (3 / 4, 4 / 3)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, epoch, index, 0x7A])


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision.transforms.RandomResizedCrop.get_params samples it."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height  # fallback: centre crop at the clamped ratio
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def to_pil(image: np.ndarray) -> Image.Image:
  img = Image.fromarray(np.asarray(image, np.uint8))
  return img.convert("RGB") if img.mode != "RGB" else img


def train_transform(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (size, size, 3) in [0, 1]."""
  return train_transform_uint8(image, size, rng).astype(np.float32) / 255.0


def train_transform_uint8(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """The train transform before ToTensor's /255 (uint8: what the stream sends to the device)."""
  img = to_pil(image)
  top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
  # crop, then resize: what torchvision's F.resized_crop does on PIL images (resizing with
  # `box=` would also read pixels outside the crop at its border).
  img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  out = np.asarray(img, np.uint8)
  if rng.uniform() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def test_transform(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (size, size, 3) in [0, 1]: short side to size*256/224 (bicubic),
  centre crop size (torchvision Resize(256) + CenterCrop(224) at size 224)."""
  return test_transform_uint8(image, size).astype(np.float32) / 255.0


def test_transform_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """The test transform before ToTensor's /255 (uint8: 4x smaller to cache)."""
  img = to_pil(image)
  short = int(round(size * 256 / 224))
  w, h = img.width, img.height
  if w <= h:
    nw, nh = short, int(short * h / w)
  else:
    nw, nh = int(short * w / h), short
  img = img.resize((nw, nh), Image.BICUBIC)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  img = img.crop((left, top, left + size, top + size))
  return np.asarray(img, np.uint8)


def resize_only(image: np.ndarray, size: int) -> np.ndarray:
  """No augmentation (train_transform='none'): bilinear resize to (size, size)."""
  return resize_only_uint8(image, size).astype(np.float32) / 255.0


def resize_only_uint8(image: np.ndarray, size: int) -> np.ndarray:
  img = to_pil(image)
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.uint8)
