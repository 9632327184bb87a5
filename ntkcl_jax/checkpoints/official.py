"""Official NTK-CL PyTorch state dicts (Programmergg/NTK-CL `PromptNet`) <-> our variables.

Official names (docs/method.md §1.1-1.6):
  backbone.{cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.{q,k,v}_proj,
      attn.proj, norm2, fc1, fc2}.*, norm.*}                         -> backbone (vit_jax names)
  backbone.channel_prompt_list.{i}.{down,up}_proj.{weight,bias}     -> trainable['channel']
  backbone.patch_prompt_list.{i}.{global_patch_prompt, prompt_norm}.* -> trainable['patch']
  backbone.{'pre_' * f}{channel,patch}_prompt_list...  (f = 1..F)   -> frozen[...][f - 1]
  fusion_model.{query,key,value}.{weight,bias}                       -> trainable['fusion']
  reg_{channel_prompt_list, patch_prompt_list, fusion_model}...     -> reg_ref (L2 targets)
  fc.{weight, sigma}                                                 -> prototypes
  proxy_fc.{weight, sigma}                                           -> proxy
Torch Linear weights are (out, in) and are transposed; q/k/v/proj kernels are reshaped to our
(D, heads, head_dim) / (heads, head_dim, D); the patch conv is OIHW -> HWIO; LayerNorm weight ->
scale; `global_patch_prompt.weight` (P, N) -> kernel (N, P).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any

import jax
import numpy as np

from ntkcl_jax import tree_utils

_ADAPTER = {"down_proj": "down_proj", "up_proj": "up_proj"}


def _t(w):
  return np.ascontiguousarray(np.asarray(w, np.float32).T)


def _peft_list(sd: dict, prefix: str, kind: str) -> dict:
  """`{prefix}.{i}.*` of one channel or patch list -> our ViT-nested PEFT tree."""
  out = {}
  for k, v in sd.items():
    m = re.match(re.escape(prefix) + r"\.(\d+)\.(\w+)\.(weight|bias)$", k)
    if not m:
      continue
    i, mod, p = m.groups()
    base = f"Transformer/encoderblock_{i}/{'adapter' if kind == 'channel' else 'prompt'}/{mod}"
    if mod == "prompt_norm":
      out[f"{base}/{'scale' if p == 'weight' else 'bias'}"] = np.asarray(v, np.float32)
    else:
      out[f"{base}/{'kernel' if p == 'weight' else 'bias'}"] = (
          _t(v) if p == "weight" else np.asarray(v, np.float32))
  return tree_utils.unflatten(out) if out else {}


def _fusion(sd: dict, prefix: str) -> dict:
  out = {}
  for name in ("query", "key", "value"):
    if f"{prefix}.{name}.weight" in sd:
      out[name] = {"kernel": _t(sd[f"{prefix}.{name}.weight"]),
                   "bias": np.asarray(sd[f"{prefix}.{name}.bias"], np.float32)}
  return out


def _backbone(sd: dict, num_heads: int) -> dict:
  g = lambda k: np.asarray(sd[k], np.float32)
  d = g("backbone.cls_token").shape[-1]
  hd = d // num_heads
  out = {"cls": g("backbone.cls_token"),
         "embedding/kernel": np.transpose(g("backbone.patch_embed.proj.weight"), (2, 3, 1, 0)),
         "embedding/bias": g("backbone.patch_embed.proj.bias"),
         "Transformer/posembed_input/pos_embedding": g("backbone.pos_embed"),
         "Transformer/encoder_norm/scale": g("backbone.norm.weight"),
         "Transformer/encoder_norm/bias": g("backbone.norm.bias")}
  i = 0
  while f"backbone.blocks.{i}.norm1.weight" in sd:
    b, o = f"backbone.blocks.{i}.", f"Transformer/encoderblock_{i}/"
    att = o + "MultiHeadDotProductAttention_1/"
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      out[att + ours + "/kernel"] = _t(g(b + f"attn.{theirs}.weight")).reshape(d, num_heads, hd)
      out[att + ours + "/bias"] = g(b + f"attn.{theirs}.bias").reshape(num_heads, hd)
    out[att + "out/kernel"] = _t(g(b + "attn.proj.weight")).reshape(num_heads, hd, d)
    out[att + "out/bias"] = g(b + "attn.proj.bias")
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      out[o + ours + "/scale"] = g(b + theirs + ".weight")
      out[o + ours + "/bias"] = g(b + theirs + ".bias")
    for ours, theirs in (("MlpBlock_3/Dense_0", "fc1"), ("MlpBlock_3/Dense_1", "fc2")):
      out[o + ours + "/kernel"] = _t(g(b + theirs + ".weight"))
      out[o + ours + "/bias"] = g(b + theirs + ".bias")
    i += 1
  return tree_utils.unflatten(out)


def _lists_and_fusion(sd: dict, list_prefix: str, fusion_prefix: str) -> dict:
  """{'channel', 'patch', 'fusion'} trees of one copy of the PEFT modules (current or L2 target);
  parts absent from the state dict are left out."""
  out = {}
  for kind in ("channel", "patch"):
    tree = _peft_list(sd, list_prefix.format(kind), kind)
    if tree:
      out[kind] = tree
  fusion = _fusion(sd, fusion_prefix)
  if fusion:
    out["fusion"] = fusion
  return out


def num_frozen_sets(sd: dict) -> int:
  f = 0
  while any(k.startswith(f"backbone.{'pre_' * (f + 1)}channel_prompt_list.") or
            k.startswith(f"backbone.{'pre_' * (f + 1)}patch_prompt_list.") for k in sd):
    f += 1
  return f


def from_official(state_dict: dict, num_heads: int = 12) -> dict:
  """An official PromptNet state dict -> {backbone, trainable, frozen, reg_ref, prototypes, proxy}.

  Missing parts (e.g. a state dict saved before `fc` existed) are simply absent from the result.
  """
  sd = {re.sub(r"^module\.", "", k): (v.detach().cpu().numpy() if hasattr(v, "detach") else
                                      np.asarray(v)) for k, v in state_dict.items()}
  out: dict[str, Any] = {}
  if "backbone.cls_token" in sd:
    out["backbone"] = _backbone(sd, num_heads)
  out["trainable"] = _lists_and_fusion(sd, "backbone.{}_prompt_list", "fusion_model")
  frozen = {}
  for kind in ("channel", "patch"):
    sets = [_peft_list(sd, f"backbone.{'pre_' * f}{kind}_prompt_list", kind)
            for f in range(1, num_frozen_sets(sd) + 1)]
    if sets and all(sets):
      frozen[kind] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *sets)
  out["frozen"] = frozen
  out["reg_ref"] = _lists_and_fusion(sd, "reg_{}_prompt_list", "reg_fusion_model")
  for ours, theirs in (("prototypes", "fc"), ("proxy", "proxy_fc")):
    if f"{theirs}.weight" in sd:
      out[ours] = {"weight": np.asarray(sd[f"{theirs}.weight"], np.float32),
                   "sigma": np.asarray(sd[f"{theirs}.sigma"], np.float32).reshape(())}
  return out


def _peft_to_official(tree: dict, prefix: str, out: dict) -> None:
  for k, v in tree_utils.flatten(tree).items():
    m = re.match(r"Transformer/encoderblock_(\d+)/(adapter|prompt)/(\w+)/(\w+)$", k)
    if not m:
      raise ValueError(f"unexpected PEFT parameter {k!r}")
    i, _, mod, p = m.groups()
    name = "weight" if p in ("kernel", "scale") else "bias"
    out[f"{prefix}.{i}.{mod}.{name}"] = _t(v) if p == "kernel" else np.asarray(v, np.float32)


def to_official(variables: dict, num_heads: int = 12) -> dict:
  """Our variables -> an official PromptNet state dict (numpy); the inverse of from_official."""
  out = {}
  if "backbone" in variables:
    flat = tree_utils.flatten(variables["backbone"])
    d = flat["cls"].shape[-1]
    out.update({"backbone.cls_token": flat["cls"],
                "backbone.patch_embed.proj.weight": np.transpose(flat["embedding/kernel"],
                                                                 (3, 2, 0, 1)),
                "backbone.patch_embed.proj.bias": flat["embedding/bias"],
                "backbone.pos_embed": flat["Transformer/posembed_input/pos_embedding"],
                "backbone.norm.weight": flat["Transformer/encoder_norm/scale"],
                "backbone.norm.bias": flat["Transformer/encoder_norm/bias"]})
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in flat:
      b, o = f"backbone.blocks.{i}.", f"Transformer/encoderblock_{i}/"
      att = o + "MultiHeadDotProductAttention_1/"
      for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[b + f"attn.{theirs}.weight"] = _t(flat[att + ours + "/kernel"].reshape(d, d))
        out[b + f"attn.{theirs}.bias"] = flat[att + ours + "/bias"].reshape(d)
      out[b + "attn.proj.weight"] = _t(flat[att + "out/kernel"].reshape(d, d))
      out[b + "attn.proj.bias"] = flat[att + "out/bias"]
      for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
        out[b + theirs + ".weight"] = flat[o + ours + "/scale"]
        out[b + theirs + ".bias"] = flat[o + ours + "/bias"]
      for ours, theirs in (("MlpBlock_3/Dense_0", "fc1"), ("MlpBlock_3/Dense_1", "fc2")):
        out[b + theirs + ".weight"] = _t(flat[o + ours + "/kernel"])
        out[b + theirs + ".bias"] = flat[o + ours + "/bias"]
      i += 1
  tr = variables.get("trainable", {})
  for kind in ("channel", "patch"):
    if kind in tr:
      _peft_to_official(tr[kind], f"backbone.{kind}_prompt_list", out)
    if kind in variables.get("frozen", {}):
      stacked = variables["frozen"][kind]
      n = jax_leading(stacked)
      for f in range(n):
        one = jax.tree_util.tree_map(lambda x, f=f: np.asarray(x)[f], stacked)
        _peft_to_official(one, f"backbone.{'pre_' * (f + 1)}{kind}_prompt_list", out)
    if kind in variables.get("reg_ref", {}):
      _peft_to_official(variables["reg_ref"][kind], f"reg_{kind}_prompt_list", out)
  for tree, prefix in ((tr.get("fusion"), "fusion_model"),
                       (variables.get("reg_ref", {}).get("fusion"), "reg_fusion_model")):
    for name, p in (tree or {}).items():
      out[f"{prefix}.{name}.weight"] = _t(p["kernel"])
      out[f"{prefix}.{name}.bias"] = np.asarray(p["bias"], np.float32)
  for ours, theirs in (("prototypes", "fc"), ("proxy", "proxy_fc")):
    if ours in variables:
      out[f"{theirs}.weight"] = np.asarray(variables[ours]["weight"], np.float32)
      out[f"{theirs}.sigma"] = np.asarray(variables[ours]["sigma"], np.float32).reshape(1)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def jax_leading(tree) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  return int(np.asarray(leaves[0]).shape[0]) if leaves else 0


def import_official(repo: str, module: str):
  """A module of a checkout of the official code (Programmergg/NTK-CL at `repo`), e.g.
  'models.learner', imported without putting the checkout on sys.path: the code's one package,
  `models` (a folder without __init__.py), is registered from `repo`. A checkout that lacks it is
  a FileNotFoundError saying so."""
  folder = os.path.join(os.path.abspath(repo), "models")
  if not os.path.isfile(os.path.join(folder, "inc_net.py")):
    raise FileNotFoundError(f"{repo} is not a checkout of Programmergg/NTK-CL "
                            "(models/inc_net.py missing)")
  package = sys.modules.get("models")
  if package is None or list(getattr(package, "__path__", [])) != [folder]:
    spec = importlib.machinery.ModuleSpec("models", None, is_package=True)
    spec.submodule_search_locations = [folder]
    sys.modules["models"] = importlib.util.module_from_spec(spec)
    for name in [m for m in sys.modules if m.startswith("models.")]:
      del sys.modules[name]  # submodules of another checkout
  return importlib.import_module(module)
