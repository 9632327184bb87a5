"""Compact storage of reference tensors from the official PyTorch code (tests/data/*.npz).

A PromptNet state dict at ViT-B width is tens of MB of random floats. Golden files therefore keep
tensors of up to `SMALL` entries as they are and store larger ones as their recipe: a seeded numpy
PCG64 draw (`seeded_tensor`) with the SHA-256 of its value, so a changed generator fails loudly.
Large tensors *computed* by the official code (a step's fusion update) are kept as a `sketch`:
seeded rows plus random projections from both sides, which any real discrepancy shows in.
Written by scripts/official_golden.py, read by tests/test_official_golden.py.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

SMALL = 65536  # entries up to which a tensor is stored as it is
SKETCH_ROWS, SKETCH_PROJ = 16, 4
REG_NOISE = 0.2  # L2 targets = current values + REG_NOISE * seeded noise
_REG_OF = {"reg_channel_prompt_list": "backbone.channel_prompt_list",
           "reg_patch_prompt_list": "backbone.patch_prompt_list",
           "reg_fusion_model": "fusion_model"}


def seeded_tensor(seed: int, index: int, shape, kind: str) -> np.ndarray:
  """Seeded random float32 value of one state-dict tensor, scaled by the kind of tensor."""
  rng = np.random.Generator(np.random.PCG64([seed, index]))
  shape = tuple(int(s) for s in shape)
  if kind == "norm_weight":
    x = 1.0 + 0.2 * rng.standard_normal(shape)
  elif kind == "weight":  # Linear / conv: torch's default scale, U(+-1/sqrt(fan_in))
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    x = rng.uniform(-1.0, 1.0, shape) / np.sqrt(fan_in)
  elif kind == "prototype":
    x = rng.standard_normal(shape)
  else:  # biases, embeddings, tokens, noise
    x = 0.05 * rng.standard_normal(shape)
  return x.astype(np.float32)


def tensor_kind(name: str) -> str:
  if name.endswith("sigma"):
    return "sigma"
  if name == "fc.weight":
    return "prototype"
  if name.endswith(".weight"):
    return "norm_weight" if "norm" in name else "weight"
  return "other"


def sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()


def _reg_value(sd: dict, name: str, seed: int, index: int) -> np.ndarray:
  head, rest = name.split(".", 1)
  noise = seeded_tensor(seed + 1, index, sd[f"{_REG_OF[head]}.{rest}"].shape, "other")
  return (sd[f"{_REG_OF[head]}.{rest}"] + REG_NOISE * noise).astype(np.float32)


def random_state_dict(shapes: dict, seed: int, first_zero_row: int) -> dict:
  """Seeded values for every tensor of a PromptNet state dict (name -> shape, in order).

  Nothing is trivially zero except what the official code itself leaves zero at a task start:
  the `fc` rows from `first_zero_row` on (current classes). fc.sigma is 1 (its only value in the
  official code); proxy_fc.sigma, trainable, is 1.25. L2 targets are the current values + noise.
  """
  out = {}
  for i, (name, shape) in enumerate(shapes.items()):
    kind = tensor_kind(name)
    if kind == "sigma":
      out[name] = np.full(shape, 1.0 if name.startswith("fc.") else 1.25, np.float32)
      continue
    out[name] = seeded_tensor(seed, i, shape, kind)
    if name == "fc.weight":
      out[name][first_zero_row:] = 0.0
  for i, name in enumerate(list(out)):
    if name.split(".", 1)[0] in _REG_OF:
      out[name] = _reg_value(out, name, seed, i)
  return out


def pack_state_dict(sd: dict, seed: int) -> dict:
  """npz entries for a state dict from `random_state_dict`: small tensors as they are, large
  ones as their recipe and SHA-256."""
  entries, recipe = {}, {}
  for i, (name, x) in enumerate(sd.items()):
    if x.size <= SMALL:
      entries[f"sd/{name}"] = x
    else:
      kind = "reg" if name.split(".", 1)[0] in _REG_OF else tensor_kind(name)
      recipe[name] = {"index": i, "shape": list(x.shape), "kind": kind, "sha256": sha256(x)}
  entries["sd_recipe"] = np.array(json.dumps({"seed": seed, "order": list(sd),
                                              "tensors": recipe}))
  return entries


def unpack_state_dict(f) -> dict:
  """The state dict of a golden file, in its original order (regenerated tensors checked)."""
  recipe = json.loads(str(f["sd_recipe"]))
  sd = {n: np.asarray(f[f"sd/{n}"]) for n in recipe["order"] if f"sd/{n}" in f}
  for name, r in recipe["tensors"].items():
    if r["kind"] != "reg":
      sd[name] = seeded_tensor(recipe["seed"], r["index"], r["shape"], r["kind"])
  for name, r in recipe["tensors"].items():
    if r["kind"] == "reg":
      sd[name] = _reg_value(sd, name, recipe["seed"], r["index"])
  for name, r in recipe["tensors"].items():
    if sha256(sd[name]) != r["sha256"]:
      raise ValueError(f"golden tensor {name} regenerated with another value (numpy's PCG64 "
                       "stream changed?): rebuild the file with scripts/official_golden.py")
  return {n: sd[n] for n in recipe["order"]}


def sketch(x: np.ndarray, seed: int = 0) -> dict:
  """Seeded rows, X R and L^T X (R, L Gaussian with SKETCH_PROJ columns) and the squared norm of
  a 2-D tensor: a few KB that any real difference between two large tensors shows in."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  rng = np.random.Generator(np.random.PCG64([seed, x.shape[0], x.shape[1]]))
  rows = np.sort(rng.choice(x.shape[0], min(SKETCH_ROWS, x.shape[0]), replace=False))
  right = rng.standard_normal((x.shape[1], SKETCH_PROJ))
  left = rng.standard_normal((x.shape[0], SKETCH_PROJ))
  return {"rows": x[rows].astype(np.float32), "right": (x @ right).astype(np.float32),
          "left": (left.T @ x).astype(np.float32),
          "sqnorm": np.float64(np.sum(x * x)).reshape(())}


def store(name: str, x: np.ndarray) -> dict:
  """npz entries of one computed tensor: itself if small, else its sketch."""
  x = np.asarray(x, np.float32)
  if x.size <= SMALL:
    return {name: x}
  return {f"{name}#sketch/{k}": v for k, v in sketch(x).items()}


def stored_names(f, prefix: str) -> list:
  """Names of the tensors stored under `prefix` (whole or sketched) in an npz or a dict."""
  names = set()
  for k in f.keys():
    if k.startswith(prefix):
      names.add(k[len(prefix):].split("#sketch/")[0])
  return sorted(names)


def load_stored(f, name: str):
  """(kind, value): ('tensor', array) or ('sketch', dict) of a `store`d entry."""
  if name in f:
    return "tensor", np.asarray(f[name])
  return "sketch", {k: np.asarray(f[f"{name}#sketch/{k}"])
                    for k in ("rows", "right", "left", "sqnorm")}
