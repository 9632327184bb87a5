"""The NTK-CL forward (docs/method.md §1.2-1.5, 4.1): branches x prompt sets -> features, logits.

Parameter naming (for converters, exporters and the NTK analysis):

  backbone   vit_jax-named dict (models/vit.py), frozen, passed explicitly (never trained).
  trainable  the current PEFT lists and the fusion:
    'channel': Transformer/encoderblock_{i}/adapter/{down_proj,up_proj}/{kernel,bias}
    'patch':   Transformer/encoderblock_{i}/prompt/global_patch_prompt/{kernel (N, P), bias (P,)}
               Transformer/encoderblock_{i}/prompt/prompt_norm/{scale, bias}
    'fusion':  {query,key,value}/{kernel (Dt, Dt), bias (Dt,)}
               (method.fusion='mlp': fc1; 'multimodal': fc1, fc2, interact)
    Only the branches the method uses are present ('ntkcl': all three; 'channel' and
    'seq_adapter': channel; 'patch': patch; 'simplecil': none).
  frozen     {'channel': the trainable['channel'] tree with a leading axis F (official
              pre_channel_prompt_list), 'patch': likewise (pre_patch_prompt_list)}; F = frozen_sets.
  proxy / prototypes: cosine heads {'weight': (C, Dt), 'sigma': ()} (models/peft.py).

Official PyTorch state dict (PromptNet) -> ours (Linear weights are transposed into kernels):
  backbone.channel_prompt_list.{i}.{down,up}_proj.{weight,bias} -> trainable/channel/Transformer/
      encoderblock_{i}/adapter/{down,up}_proj/{kernel,bias}
  backbone.patch_prompt_list.{i}.global_patch_prompt.{weight,bias} -> trainable/patch/Transformer/
      encoderblock_{i}/prompt/global_patch_prompt/{kernel,bias}
  backbone.patch_prompt_list.{i}.prompt_norm.{weight,bias} -> .../prompt/prompt_norm/{scale,bias}
  backbone.pre_{channel,patch}_prompt_list.* -> frozen/{channel,patch} (index 0 of the set axis)
  fusion_model.{query,key,value}.* -> trainable/fusion/{query,key,value}/*
  reg_{channel,patch}_prompt_list, reg_fusion_model -> learner state['reg_ref'] (same layout)
  fc.weight, fc.sigma -> state['prototypes'] (sigma is 1, never trained);
  proxy_fc.{weight,sigma} -> state['params']['proxy'] {'weight', 'sigma'} (rows padded to max task)

Feature layout: every branch's feature is the concatenation of D-wide sections, outermost first:
[PTM (if use_init_ptm) ; frozen set 0 .. F-1 ; current] (docs/method.md §1.4), so Dt = S * D.

Precision policy (docs/design.md, "Precision, fused attention and remat"): the ViT, the PEFT
modules and the fusion compute in `model.dtype`; `features` returns at least float32, so the
losses, logits, prototypes and NTK readouts downstream never run in bf16.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp

from ntkcl_jax import switches as switches_lib
from ntkcl_jax import tree_utils
from ntkcl_jax.models import peft
from ntkcl_jax.models import vit

METHODS = ("ntkcl", "channel", "patch", "simplecil", "seq_adapter")


# The compute-policy keys of the `model` config section and the ViTConfig fields they set.
POLICY_KEYS = ("dtype", "matmul_precision", "attention", "remat")
DTYPES = ("float32", "bfloat16")


AUTO = "auto"
# What 'auto' compute-policy keys become on each platform: the CPU keeps float32, 'highest'
# matmuls and the official op order (every CPU result and the parity tests stay exact); GPUs and
# TPUs compute in bf16 with fused (on a GPU, cuDNN flash) attention at the platform's default
# matmul precision (TF32 on A100/H100, one bf16 pass on TPU).
AUTO_POLICY = {"cpu": {"dtype": "float32", "matmul_precision": "highest", "attention": "einsum"},
               "accelerator": {"dtype": "bfloat16", "matmul_precision": "",
                               "attention": "fused"}}


def policy_for(platform: str) -> dict:
  """The concrete compute policy 'auto' stands for on a JAX platform ('cpu', 'gpu', 'tpu')."""
  return AUTO_POLICY["cpu" if platform == "cpu" else "accelerator"]


def resolve_policy(config, platform: Optional[str] = None):
  """The config with every 'auto' key of model.dtype / matmul_precision / attention set for the
  platform (default: the running JAX backend); a config without 'auto' is returned as is. The
  launcher saves the resolved config, so a run names its real policy."""
  m = config.model
  auto = [k for k in AUTO_POLICY["cpu"] if m[k] == AUTO]
  if not auto:
    return config
  concrete = policy_for(platform or jax.default_backend())
  out = config.copy_and_resolve_references()
  with out.unlocked():
    for k in auto:
      out.model[k] = concrete[k]
  return out


def vit_config(config) -> vit.ViTConfig:
  """The backbone's ViTConfig of a run config (`model.name`, `image_size`, `overrides`, and the
  compute policy `dtype`, `matmul_precision`, `attention`, `remat`; 'auto' keys are resolved for
  the running platform)."""
  m = resolve_policy(config).model
  overrides = m.overrides.to_dict()
  clash = sorted(set(overrides) & set(POLICY_KEYS))
  if clash:
    raise ValueError(f"model.overrides.{clash[0]} is not a shape override: set "
                     f"model.{clash[0]} instead (e.g. --config.model.{clash[0]}=...)")
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype={m.dtype!r}: choose one of {DTYPES} (parameters, optimiser "
                     "state and losses stay float32 either way)")
  return vit.get_config(m.name, image_size=m.image_size, dtype=jnp.dtype(m.dtype),
                        matmul_precision=m.matmul_precision or None, attention=m.attention,
                        remat=bool(m.remat), **overrides)


def matmul_precision(spec: "ModelSpec"):
  """Context for code outside the model (losses, prototypes, logits) that traces its matmuls at
  the model's `matmul_precision` (vit.precision_context)."""
  return vit.precision_context(spec.vit.matmul_precision)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Static description of the NTK-CL model (hashable: a jit static argument)."""
  vit: vit.ViTConfig
  method: str = "ntkcl"            # ntkcl | channel | patch | simplecil | seq_adapter
  ffn_num: int = 16                # adapter bottleneck width (docs/method.md §1.2)
  ffn_scalar: float = 0.1          # adapter output and prompt residual scale
  adapter_dropout: float = 0.1
  fusion_dropout: float = 0.1      # on the fusion's attention weights (§1.5)
  num_prompts: int = 10            # P generated prompt tokens per block (§1.3)
  frozen_sets: int = 1             # F: the pre_ prompt lists (§1.4)
  use_init_ptm: bool = False       # prepend the plain ViT feature as a section
  switches: switches_lib.Switches = switches_lib.Switches()  # corrected mode (docs/variants.md)
  section_weights: tuple = (0.3, 0.1)  # test-time section weights, outermost first (§4.1)
  fusion: str = "attention"  # attention (official) | mlp | multimodal (official dead alternatives)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
    if self.frozen_sets not in (0, 1):
      raise ValueError(f"frozen_sets={self.frozen_sets}: only 0 or 1 is supported (the official "
                       "code is only consistent for F=1, docs/method.md §1.4)")
    if self.fusion not in peft.FUSIONS:
      raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {sorted(peft.FUSIONS)}")
    if len(self.section_weights) != self.num_sections:
      raise ValueError(f"section_weights {self.section_weights} must have {self.num_sections} "
                       f"entries for method {self.method!r} (sections: "
                       f"{'PTM, ' if self.has_ptm else ''}frozen x {self.num_frozen}, current)")

  @property
  def branches(self) -> tuple:
    return {"ntkcl": ("channel", "patch"), "channel": ("channel",), "patch": ("patch",),
            "seq_adapter": ("channel",), "simplecil": ()}[self.method]

  @property
  def num_frozen(self) -> int:
    return 0 if self.method in ("seq_adapter", "simplecil") else self.frozen_sets

  @property
  def has_ptm(self) -> bool:
    return self.method == "simplecil" or (self.use_init_ptm and self.method != "seq_adapter")

  @property
  def num_sections(self) -> int:
    if self.method == "simplecil":
      return 1
    return int(self.has_ptm) + self.num_frozen + 1

  @property
  def feature_dim(self) -> int:
    return self.num_sections * self.vit.hidden_size

  def channel_factory(self):
    return functools.partial(peft.ChannelAdapter, ffn_num=self.ffn_num, scalar=self.ffn_scalar,
                             dropout=self.adapter_dropout, dtype=self.vit.dtype)

  def patch_factory(self):
    return functools.partial(peft.PatchPrompt, num_prompts=self.num_prompts,
                             scalar=self.ffn_scalar, nonzero_init=self.switches.fix_patch_init,
                             dtype=self.vit.dtype)

  def vit_module(self, branch: Optional[str]) -> vit.ViT:
    if branch == "channel":
      return vit.ViT(self.vit, mlp_adapter=self.channel_factory())
    if branch == "patch":
      return vit.ViT(self.vit, token_hook=self.patch_factory())
    return vit.ViT(self.vit)

  def fusion_module(self):
    if self.fusion != "attention":
      return peft.FUSIONS[self.fusion](dtype=self.vit.dtype)
    return peft.AttentionFusion(num_heads=8, dropout=self.fusion_dropout,
                                multi_token=self.switches.fix_fusion, dtype=self.vit.dtype)


def spec_from_config(config) -> ModelSpec:
  """The ModelSpec of a run config: its ViT (`model`), method and switches (`method`); section
  weights default as docs/method.md §4.1."""
  m = config.method
  sw = tuple(float(w) for w in m.section_weights)
  n_sec = _num_sections(m.name, m.frozen_sets, m.use_init_ptm)
  if len(sw) != n_sec:
    if n_sec == 1:
      sw = (1.0,)
    elif len(sw) == n_sec - 1 and m.use_init_ptm:
      sw = (1.0,) + sw  # official [beta, gamma, alpha] = [1.0, 0.3, 0.1]
  return ModelSpec(vit_config(config), method=m.name, ffn_num=m.ffn_num, ffn_scalar=m.ffn_scalar,
                   adapter_dropout=m.adapter_dropout, fusion_dropout=m.fusion_dropout,
                   num_prompts=m.num_prompt_tokens, frozen_sets=m.frozen_sets,
                   use_init_ptm=m.use_init_ptm, switches=switches_lib.from_config(config), section_weights=sw,
                   fusion=m.fusion)


def _num_sections(method, frozen_sets, use_init_ptm):
  if method in ("simplecil", "seq_adapter"):
    return 1
  return int(bool(use_init_ptm)) + frozen_sets + 1


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
def _branch_params(spec: ModelSpec, branch: str, key) -> dict:
  """Fresh PEFT tree of one branch (only the adapter / prompt leaves of an initialised ViT)."""
  model = spec.vit_module(branch)
  x = jnp.zeros((1, spec.vit.image_size, spec.vit.image_size, 3), jnp.float32)
  tag = "/adapter/" if branch == "channel" else "/prompt/"
  # Initialising the whole ViT only to keep the PEFT leaves: the backbone part is dead code.
  full = model.init(key, x)["params"]
  return tree_utils.split(full, lambda k: tag in k)[0]


@functools.partial(jax.jit, static_argnums=0)
def init_trainable(spec: ModelSpec, key) -> dict:
  """Current PEFT lists + fusion, official initialisation (docs/method.md §1.2, 1.3, 1.5)."""
  keys = jax.random.split(key, 3)
  out = {b: _branch_params(spec, b, k) for b, k in zip(("channel", "patch"), keys)
         if b in spec.branches}
  if spec.method == "ntkcl":
    d = spec.feature_dim
    out["fusion"] = spec.fusion_module().init(keys[2], jnp.zeros((1, d)), jnp.zeros((1, d)))[
        "params"]
  return out


@functools.partial(jax.jit, static_argnums=0)
def init_frozen(spec: ModelSpec, key) -> dict:
  """The F frozen (pre_) lists: own random draws, stacked on a leading axis (docs/method.md §1.4)."""
  out = {}
  for i, b in enumerate(("channel", "patch")):
    if b in spec.branches and spec.num_frozen:
      ks = jax.random.split(jax.random.fold_in(key, i), spec.num_frozen)
      out[b] = jax.vmap(lambda k, b=b: _branch_params(spec, b, k))(ks)
  return out


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def _stack_sets(frozen_sets: Any, current: Any) -> Any:
  """[frozen (no gradient) ; current] along a leading set axis."""
  cur = jax.tree_util.tree_map(lambda x: x[None], current)
  if frozen_sets is None:
    return cur
  frozen_sets = jax.lax.stop_gradient(frozen_sets)
  return jax.tree_util.tree_map(lambda f, c: jnp.concatenate([f, c], 0), frozen_sets, cur)


def branch_sections(spec: ModelSpec, branch: str, backbone, sets, images, *, train: bool,
                    rng=None):
  """CLS features of every prompt set of one branch, batched with vmap: (B, S_sets, D)."""
  model = spec.vit_module(branch)
  n = jax.tree_util.tree_leaves(sets)[0].shape[0]
  keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0), n)

  def one(peft_set, key):
    rngs = {"dropout": key} if train else {}
    return model.apply({"params": tree_utils.merge(backbone, peft_set)}, images,
                       deterministic=not train, rngs=rngs)
  return jnp.moveaxis(jax.vmap(one)(sets, keys), 0, 1)


def _branch_all_sets(spec, branch, backbone, frozen_sets, current, images, train, rng):
  """(B, F+1, D) sections of one branch. Eval: one vmap over [frozen ; current]. Train: the
  frozen sets run forward-only under stop_gradient and the current set separately, because a
  vmapped batch would also pay the backward pass of the frozen slices (AD cannot see that only
  one slice of the stacked parameters has a tangent)."""
  if frozen_sets is None or not train:
    return branch_sections(spec, branch, backbone, _stack_sets(frozen_sets, current), images,
                           train=train, rng=rng)
  k_frozen, k_cur = jax.random.split(rng)
  frozen_secs = jax.lax.stop_gradient(branch_sections(
      spec, branch, backbone, jax.lax.stop_gradient(frozen_sets), images, train=True,
      rng=k_frozen))
  cur = branch_sections(spec, branch, backbone, _stack_sets(None, current), images, train=True,
                        rng=k_cur)
  return jnp.concatenate([frozen_secs, cur], axis=1)


def ptm_feature(spec: ModelSpec, backbone, images):
  """The plain frozen ViT CLS feature (no gradient), computed once per batch."""
  return jax.lax.stop_gradient(spec.vit_module(None).apply({"params": backbone}, images))


def features(spec: ModelSpec, backbone, trainable, frozen, images, *, train: bool = False,
             rng=None, ptm: Optional[jax.Array] = None) -> dict:
  """NTK-CL features (pure function; differentiable w.r.t. `trainable` only).

  Returns dict(channel=(B, Dt), patch=(B, Dt), fused=(B, Dt), channel_sections=(B, S, D),
  patch_sections=(B, S, D)); for single-branch methods the missing branch and `fused` alias the
  branch present (docs/method.md §3.5: 'channel'/'patch' modes use c / p), for 'simplecil' all are the PTM.
  `ptm`: a precomputed PTM feature (B, D) to reuse; `rng` is needed when train=True (dropout).
  Computed in spec.vit.dtype at spec.vit.matmul_precision; every output is at least float32.
  """
  chex.assert_rank(images, 4)
  if train and rng is None:
    raise ValueError("features(train=True) needs an rng for adapter/fusion dropout")
  with vit.precision_context(spec.vit.matmul_precision):
    out = _features(spec, backbone, trainable, frozen, images, train, rng, ptm)
  return jax.tree_util.tree_map(lambda x: x.astype(vit.softmax_dtype(x.dtype)), out)


def _features(spec, backbone, trainable, frozen, images, train, rng, ptm):
  """`features` in the compute dtype."""
  if spec.has_ptm and ptm is None:
    ptm = ptm_feature(spec, backbone, images)
  if ptm is not None:
    ptm = ptm.astype(spec.vit.dtype)
  rngs = jax.random.split(rng, 3) if rng is not None else [None] * 3
  out = {}
  for i, b in enumerate(spec.branches):
    secs = _branch_all_sets(spec, b, backbone, frozen.get(b), trainable[b], images, train,
                            rngs[i])
    if spec.has_ptm:
      secs = jnp.concatenate([ptm[:, None], secs], axis=1)
    out[b + "_sections"] = secs
    out[b] = secs.reshape(secs.shape[0], -1)
  if spec.method == "simplecil":
    out["channel"] = out["patch"] = out["fused"] = ptm
    out["channel_sections"] = out["patch_sections"] = ptm[:, None]
    return out
  if spec.method == "ntkcl":
    out["fused"] = spec.fusion_module().apply({"params": trainable["fusion"]}, out["channel"],
                                              out["patch"], deterministic=not train,
                                              rngs={"dropout": rngs[2]} if train else {})
  else:
    b = spec.branches[0]
    out["fused"] = out[b]
    other = "patch" if b == "channel" else "channel"
    out[other], out[other + "_sections"] = out[b], out[b + "_sections"]
  return out


# jit-compiled `features` (spec and train are static), for eager callers such as tests / analysis.
features_jit = jax.jit(features, static_argnums=0, static_argnames=("train",))


def eval_logits(spec: ModelSpec, prototypes, fused, num_seen, sigma=1.0):
  """forward_reweight over the seen classes (docs/method.md §4.1), scaled by the prototype head's sigma
  (fc.sigma: 1 in every run of ours; kept from imported official models); unseen get -inf."""
  with matmul_precision(spec):
    logits = peft.reweighted_logits(fused, prototypes, spec.section_weights, sigma)
  return jnp.where(jnp.arange(prototypes.shape[0]) < num_seen, logits, -jnp.inf)


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def abstract_trainable(spec: ModelSpec):
  """Shapes of the trainable tree without computing anything (e.g. ViT-B/16 counts)."""
  return jax.eval_shape(functools.partial(init_trainable, spec), jax.random.PRNGKey(0))

