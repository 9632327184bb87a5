"""timm and Hugging Face PyTorch state dicts (.pth/.bin/.safetensors) -> our flat names.

timm ViT: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2,ls1.gamma,ls2.gamma}`, `norm`. Hugging Face ViT/Dinov2:
`[vit.|dinov2.]embeddings.*`, `encoder.layer.i.{layernorm_before|norm1, attention.attention.
{query,key,value}, attention.output.dense, layernorm_after|norm2, intermediate.dense|mlp.fc1,
output.dense|mlp.fc2, layer_scale{1,2}.lambda1}`, `layernorm`. Torch Linear weights are
(out, in): transposed; q/k/v/out reshaped to (D, heads, head_dim) / (heads, head_dim, D); the
patch conv OIHW -> HWIO.
"""
from __future__ import annotations

import os
import re

import numpy as np

from ntkcl_jax.checkpoints.errors import CheckpointError


def read(path: str) -> dict:
  """A state dict as numpy float32 arrays; a corrupt or truncated file -> CheckpointError."""
  try:
    return _read(path)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (torch/safetensors raise many types)
    raise CheckpointError(f"{path}: cannot be read as a state dict ({type(e).__name__}: "
                          f"{str(e)[:200]}); the file is corrupt or truncated: download it "
                          "again") from e


def _read(path: str) -> dict:
  """A state dict as numpy float32 arrays (torch imported only for .pth/.bin)."""
  # torch and safetensors are optional (only these file kinds need them): imported here
  if path.endswith(".safetensors"):
    try:  # torch reads bfloat16 files too; plain numpy is enough for float16/32
      from safetensors.torch import load_file as load_torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    return {k: v.float().numpy() for k, v in load_torch(path).items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f"{path}: reading a PyTorch .pth/.bin file needs torch; install it "
                          "(`bash install.sh parity`) or convert the file to .safetensors") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "module"):
    if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
      sd = sd[key]
  return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def _dense(w, b, prefix, out, heads=None, kind="plain"):
  w = np.asarray(w).T  # (in, out)
  d_in, d_out = w.shape
  if kind == "qkv":
    out[prefix + "/kernel"] = w.reshape(d_in, heads, d_out // heads)
    if b is not None:
      out[prefix + "/bias"] = np.asarray(b).reshape(heads, d_out // heads)
  elif kind == "out":
    out[prefix + "/kernel"] = w.reshape(heads, d_in // heads, d_out)
    if b is not None:
      out[prefix + "/bias"] = np.asarray(b)
  else:
    out[prefix + "/kernel"] = w
    if b is not None:
      out[prefix + "/bias"] = np.asarray(b)


_TIMM = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_2", "mlp.fc1": "MlpBlock_3/Dense_0",
         "mlp.fc2": "MlpBlock_3/Dense_1", "attn.proj": "MultiHeadDotProductAttention_1/out",
         "ls1": "LayerScale_1", "ls2": "LayerScale_2"}
_HF = {"layernorm_before": "LayerNorm_0", "norm1": "LayerNorm_0", "layernorm_after": "LayerNorm_2",
       "norm2": "LayerNorm_2", "intermediate.dense": "MlpBlock_3/Dense_0",
       "mlp.fc1": "MlpBlock_3/Dense_0", "output.dense": "MlpBlock_3/Dense_1",
       "mlp.fc2": "MlpBlock_3/Dense_1", "attention.output.dense":
       "MultiHeadDotProductAttention_1/out", "attention.attention.query":
       "MultiHeadDotProductAttention_1/query", "attention.attention.key":
       "MultiHeadDotProductAttention_1/key", "attention.attention.value":
       "MultiHeadDotProductAttention_1/value", "layer_scale1": "LayerScale_1",
       "layer_scale2": "LayerScale_2"}


def kind(sd: dict) -> str:
  return "timm" if any(k.startswith("blocks.") for k in sd) else "hf"


def to_ours(sd: dict, num_heads: int) -> dict:
  """A timm or HF ViT/DINOv2 state dict -> our flat names; unknown keys keep their torch name."""
  if kind(sd) == "timm":
    return _convert(sd, num_heads, _TIMM, r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", timm=True)
  sd = {re.sub(r"^(vit|dinov2|backbone)\.", "", k): v for k, v in sd.items()}
  return _convert(sd, num_heads, _HF,
                  r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", timm=False)


def _convert(sd, heads, table, block_re, timm):
  out, used = {}, set()
  pe = "patch_embed.proj" if timm else "embeddings.patch_embeddings.projection"
  if pe + ".weight" in sd:
    out["embedding/kernel"] = np.transpose(sd[pe + ".weight"], (2, 3, 1, 0))
    out["embedding/bias"] = sd[pe + ".bias"]
    used |= {pe + ".weight", pe + ".bias"}
  cls, pos, norm = (("cls_token", "pos_embed", "norm") if timm else
                    ("embeddings.cls_token", "embeddings.position_embeddings", "layernorm"))
  if cls in sd:
    out["cls"] = sd[cls]
    used.add(cls)
  if pos in sd:
    out["Transformer/posembed_input/pos_embedding"] = sd[pos]
    used.add(pos)
  for p in ("weight", "bias"):
    if f"{norm}.{p}" in sd:
      out[f"Transformer/encoder_norm/{'scale' if p == 'weight' else 'bias'}"] = sd[f"{norm}.{p}"]
      used.add(f"{norm}.{p}")
  blocks = {}
  for k, v in sd.items():
    m = re.match(block_re, k)
    if m:
      blocks.setdefault(int(m.group(1)), {})[(m.group(2), m.group(3))] = (k, v)
  for i, entries in blocks.items():
    pre = f"Transformer/encoderblock_{i}/"
    for (mod, p), (k, v) in entries.items():
      if timm and mod == "attn.qkv":
        if p == "weight":
          q, kk, vv = np.split(v, 3, axis=0)
          bq, bk, bv = np.split(entries[("attn.qkv", "bias")][1], 3) if (
              "attn.qkv", "bias") in entries else (None, None, None)
          for name, w, b in (("query", q, bq), ("key", kk, bk), ("value", vv, bv)):
            _dense(w, b, pre + "MultiHeadDotProductAttention_1/" + name, out, heads, "qkv")
          used.add(k)
          used.add(entries.get(("attn.qkv", "bias"), (None,))[0])
        continue
      if mod not in table:
        continue
      target = pre + table[mod]
      if table[mod].startswith("LayerScale"):
        out[target + "/scale"] = v
      elif table[mod].startswith("LayerNorm"):
        out[target + ("/scale" if p == "weight" else "/bias")] = v
      elif p == "weight":
        bias = entries.get((mod, "bias"), (None, None))[1]
        kind_ = ("out" if table[mod].endswith("/out") else
                 "qkv" if "MultiHead" in table[mod] else "plain")
        _dense(v, bias, target, out, heads, kind_)
        used.add(entries.get((mod, "bias"), (None,))[0])
      used.add(k)
  for k, v in sd.items():
    if k not in used:
      out["torch:" + k] = v  # reported as unexpected
  return out


def from_ours_timm(flat: dict) -> dict:
  """Our flat names -> a timm ViT state dict (numpy), the inverse of to_ours for timm files."""
  sd = {"patch_embed.proj.weight": np.transpose(flat["embedding/kernel"], (3, 2, 0, 1)),
        "patch_embed.proj.bias": flat["embedding/bias"], "cls_token": flat["cls"],
        "pos_embed": flat["Transformer/posembed_input/pos_embedding"],
        "norm.weight": flat["Transformer/encoder_norm/scale"],
        "norm.bias": flat["Transformer/encoder_norm/bias"]}
  i = 0
  while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in flat:
    pre, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    att = pre + "MultiHeadDotProductAttention_1/"
    d = flat[att + "query/kernel"].shape[0]
    sd[b + "attn.qkv.weight"] = np.concatenate(
        [flat[att + n + "/kernel"].reshape(d, d).T for n in ("query", "key", "value")])
    sd[b + "attn.qkv.bias"] = np.concatenate(
        [flat[att + n + "/bias"].reshape(-1) for n in ("query", "key", "value")])
    sd[b + "attn.proj.weight"] = flat[att + "out/kernel"].reshape(d, d).T
    sd[b + "attn.proj.bias"] = flat[att + "out/bias"]
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      sd[b + theirs + ".weight"] = flat[pre + ours + "/scale"]
      sd[b + theirs + ".bias"] = flat[pre + ours + "/bias"]
    for ours, theirs in (("MlpBlock_3/Dense_0", "mlp.fc1"), ("MlpBlock_3/Dense_1", "mlp.fc2")):
      sd[b + theirs + ".weight"] = flat[pre + ours + "/kernel"].T
      sd[b + theirs + ".bias"] = flat[pre + ours + "/bias"]
    for ours, theirs in (("LayerScale_1", "ls1"), ("LayerScale_2", "ls2")):
      if pre + ours + "/scale" in flat:
        sd[b + theirs + ".gamma"] = flat[pre + ours + "/scale"]
    i += 1
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def is_torch_file(path: str) -> bool:
  return os.path.splitext(path)[1] in (".pth", ".pt", ".bin", ".safetensors")
