"""Google ViT `.npz` files -> our flat 'a/b/c' names (vit_jax, AugReg, pre-Linen, big_vision).

vit_jax and AugReg files already use our names. Old optimizer checkpoints carry
an `opt/target/` prefix. big_vision files carry `params/` (or `params/img/`), Linen numbering
(`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0/Dense_0`), a top-level
`pos_embedding` that excludes the CLS slot, and possibly a scanned `encoderblock` with a leading
layer axis.
"""
from __future__ import annotations

import re

import numpy as np

_BV_BLOCK = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
             "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
             "MlpBlock_0": "MlpBlock_3"}


def kind(keys) -> str:
  """'big_vision' | 'vit_jax' (Linen and pre-Linen vit_jax files share one key layout).

  big_vision files are recognised by a `params/` prefix, a top-level (or Encoder-level)
  `pos_embedding`, Linen block numbering or a scanned `encoderblock` (big_vision vit.py).
  """
  keys = list(keys)
  return "big_vision" if any(
      k.startswith(("params/", "Transformer/encoderblock/")) or k in (
          "pos_embedding", "Transformer/pos_embedding") or
      "/MultiHeadDotProductAttention_0/" in k for k in keys) else "vit_jax"


def to_ours(arrays: dict) -> dict:
  """Renames a Google .npz's flat dict to our flat names; unknown keys pass through."""
  if kind(arrays) == "big_vision":
    return _big_vision(arrays)
  out = {}
  for k, v in arrays.items():
    k = k[len("opt/target/"):] if k.startswith("opt/target/") else k
    out[k] = v
  return out


def _big_vision(arrays: dict) -> dict:
  out = {}
  prefix = next((p for p in ("params/img/", "params/") if any(k.startswith(p) for k in arrays)),
                "")
  for k, v in arrays.items():
    if not k.startswith(prefix):
      out[k] = v
      continue
    k = k[len(prefix):]
    if k in ("pos_embedding", "Transformer/pos_embedding"):
      n = v.shape[1]
      if int(np.sqrt(n)) ** 2 == n:  # (1, g*g, D), added before the CLS is prepended: the CLS
        v = np.concatenate([np.zeros_like(v[:, :1]), v], axis=1)  # gets a zero position
      out["Transformer/posembed_input/pos_embedding"] = v  # else g*g+1: old layout, CLS slot kept
      continue
    m = re.match(r"Transformer/encoderblock(_\d+)?/([^/]+)/(.*)", k)
    if m:
      sub = _BV_BLOCK.get(m.group(2), m.group(2))
      if m.group(1) is None:  # scanned: leading layer axis
        for i in range(v.shape[0]):
          out[f"Transformer/encoderblock_{i}/{sub}/{m.group(3)}"] = v[i]
      else:
        out[f"Transformer/encoderblock{m.group(1)}/{sub}/{m.group(3)}"] = v
      continue
    out[k] = v
  return out


def from_ours(flat: dict) -> dict:
  """Our flat names -> a vit_jax/AugReg .npz dict (the identity: the names are the same)."""
  return dict(flat)
