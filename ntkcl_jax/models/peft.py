"""NTK-CL's PEFT modules: channel adapter, patch-prompt generator, fusion, cosine heads.

Each module plugs into the ONE ViT (`models/vit.py`) through its extension points; none copies the
ViT. Parameter names mirror the official PyTorch modules (docs/method.md §1.2-1.6) so a converter
maps them one to one (PyTorch Linear weight (out, in) = our Dense kernel (in, out) transposed):

  ChannelAdapter  (ViT `mlp_adapter`, name 'adapter'):  down_proj/{kernel (D, r), bias (r,)},
                                                         up_proj/{kernel (r, D), bias (D,)}
  PatchPrompt     (ViT `token_hook`,  name 'prompt'):   global_patch_prompt/{kernel (N, P),
                                                                             bias (P,)},
                                                         prompt_norm/{scale (D,), bias (D,)}
  AttentionFusion:                                       query|key|value/{kernel (Dt, Dt),
                                                                         bias (Dt,)}
  cosine classifier (plain pytree, not a module):       {'weight': (C, Dt), 'sigma': ()}

Every module takes `dtype`, the compute dtype (None: inferred from inputs and parameters, the flax
default); parameters are created float32 (flax `param_dtype`) whatever it is, and softmaxes run in
at least float32 (docs/design.md, "Precision, fused attention and remat").
"""
from __future__ import annotations

import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ntkcl_jax.models import vit


def torch_linear_init(fan_in: int):
  """PyTorch nn.Linear default init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) (docs/method.md §1.2)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class ChannelAdapter(nn.Module):
  """AdaptFormer parallel adapter: scalar * Up(Drop(ReLU(Down(h)))) (docs/method.md §1.2); Up starts at 0."""
  layer: int = 0
  ffn_num: int = 16
  scalar: float = 0.1
  dropout: float = 0.1
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, h, deterministic: bool = True):
    d = h.shape[-1]
    x = nn.Dense(self.ffn_num, kernel_init=torch_linear_init(d), bias_init=nn.initializers.zeros,
                 dtype=self.dtype, name="down_proj")(h)
    x = nn.Dropout(self.dropout)(nn.relu(x), deterministic=deterministic)
    x = nn.Dense(d, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                 dtype=self.dtype, name="up_proj")(x)
    return self.scalar * x


class PatchPrompt(nn.Module):
  """Generated prompt tokens inserted after CLS (docs/method.md §1.3), as a ViT `token_hook`.

  Token layout [CLS, prompt_1..P, patch tokens]. At layer 0 the input has no prompts; from layer 1
  on the P old prompts r are taken out, g = LN_p(Mix(non-prompt tokens)) is generated, and
  prompts = g + scalar * r are re-inserted. Residual (official): layer 0 -> no residual at prompt
  positions; layer >= 1 -> the old post-attention prompt r. Mix is a Linear over the token axis,
  sized by the actual token count at init, so any resolution / patch size works.
  `nonzero_init` (fix_patch_init, docs/method.md §10 switch 6): Mix ~ U(+-1/sqrt(N)) and LN gamma = 1 instead
  of the official all-zero init whose only trainable degree of freedom is LN beta.
  """
  layer: int = 0
  num_prompts: int = 10
  scalar: float = 0.1
  nonzero_init: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, h, deterministic: bool = True):
    del deterministic
    if self.dtype is not None:
      h = h.astype(self.dtype)
    p = self.num_prompts
    if self.layer == 0:
      base, old = h, None
    else:
      chex.assert_axis_dimension_gt(h, 1, p)
      base = jnp.concatenate([h[:, :1], h[:, 1 + p:]], axis=1)
      old = h[:, 1:1 + p]
    n = base.shape[1]
    k_init = torch_linear_init(n) if self.nonzero_init else nn.initializers.zeros
    w = self.param("global_patch_prompt", lambda key: {
        "kernel": k_init(key, (n, p)), "bias": jnp.zeros((p,))})
    mixed = jnp.einsum("bnd,np->bpd", base, w["kernel"].astype(h.dtype)) + \
        w["bias"].astype(h.dtype)[None, :, None]
    scale_init = nn.initializers.ones if self.nonzero_init else nn.initializers.zeros
    g = nn.LayerNorm(epsilon=1e-6, scale_init=scale_init, bias_init=nn.initializers.zeros,
                     dtype=self.dtype, name="prompt_norm")(mixed)
    prompts = g if old is None else g + self.scalar * old
    z = jnp.concatenate([base[:, :1], prompts, base[:, 1:]], axis=1)
    if old is None:
      residual = jnp.concatenate([h[:, :1], jnp.zeros_like(prompts), h[:, 1:]], axis=1)
    else:
      residual = h
    return z, residual


class AttentionFusion(nn.Module):
  """The official AttentionFusion (docs/method.md §1.5): m = 0.5 * drop(attn) @ V + c + 0.1 * p.

  Official: Q from p, K and V from c, one token each, so softmax over one key == 1 and Q/K get
  exactly zero gradient (kept literally, so this degeneracy is reproduced, not hard-coded).
  `multi_token` (fix_fusion, docs/method.md §10 switch 1, our design): keys and values come from the two
  tokens [c, p], so the softmax over two keys is not constant and Q, K reach the output.
  Dropout (p=fusion_dropout) acts on the (B, H, 1, keys) attention weights, as in the official code.
  """
  num_heads: int = 8
  dropout: float = 0.1
  multi_token: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, c, p, deterministic: bool = True):
    chex.assert_equal_shape([c, p])
    c, p = _cast(self.dtype, c, p)
    b, d = c.shape
    if d % self.num_heads:
      raise ValueError(f"fusion dim {d} is not divisible by {self.num_heads} heads")
    hd = d // self.num_heads
    dense = lambda name: nn.Dense(d, kernel_init=torch_linear_init(d),
                                  bias_init=torch_linear_init(d), dtype=self.dtype, name=name)
    kv_in = jnp.stack([c, p], 1) if self.multi_token else c[:, None]
    heads = lambda x: x.reshape(b, x.shape[1], self.num_heads, hd).transpose(0, 2, 1, 3)
    q = heads(dense("query")(p[:, None]))
    k = heads(dense("key")(kv_in))
    v = heads(dense("value")(kv_in))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    attn = jax.nn.softmax(logits.astype(vit.softmax_dtype(logits.dtype)), axis=-1).astype(v.dtype)
    attn = nn.Dropout(self.dropout)(attn, deterministic=deterministic)
    fused = (attn @ v).transpose(0, 2, 1, 3).reshape(b, d)
    return 0.5 * fused + 1.0 * c + 0.1 * p


def _cast(dtype, *xs):
  """xs in `dtype` (unchanged for None)."""
  return xs if dtype is None else tuple(x.astype(dtype) for x in xs)


class _PlainFusion(nn.Module):
  """What the official plain fusion alternatives share (ablations only): c and p cast to the
  compute dtype, and a dense layer of width D with PyTorch's default init for `fan_in` inputs."""
  dtype: Optional[Any] = None

  def inputs(self, c, p):
    """(c, p, D): the inputs in the compute dtype and their width."""
    c, p = _cast(self.dtype, c, p)
    return c, p, c.shape[-1]

  def dense(self, d: int, fan_in: int, name: str, x):
    return nn.Dense(d, kernel_init=torch_linear_init(fan_in), bias_init=torch_linear_init(fan_in),
                    dtype=self.dtype, name=name)(x)


class FusionNetwork(_PlainFusion):
  """Official plain alternative (unused by the official runs): m = 0.5 ReLU(W[c;p]) + c + p."""

  @nn.compact
  def __call__(self, c, p, deterministic: bool = True):
    del deterministic
    c, p, d = self.inputs(c, p)
    return 0.5 * nn.relu(self.dense(d, 2 * d, "fc1", jnp.concatenate([c, p], -1))) + c + p


class MultimodalFusion(_PlainFusion):
  """Official plain alternative: i = ReLU(fc1(c*p)) * interact; m = 0.1 ReLU(fc2[c;p;i]) + c + p."""

  @nn.compact
  def __call__(self, c, p, deterministic: bool = True):
    del deterministic
    c, p, d = self.inputs(c, p)
    inter = nn.relu(self.dense(d, d, "fc1", c * p))
    inter = inter * self.param("interact", nn.initializers.normal(1.0), (d,)).astype(inter.dtype)
    return 0.1 * nn.relu(self.dense(d, 3 * d, "fc2", jnp.concatenate([c, p, inter], -1))) + c + p


FUSIONS = {"attention": AttentionFusion, "mlp": FusionNetwork, "multimodal": MultimodalFusion}


# ------------------------------------------------------------------------------------------------
# Cosine classifiers (docs/method.md §1.6, 4.1)
# ------------------------------------------------------------------------------------------------
def l2_normalize(x, axis=-1, eps=1e-12):
  """F.normalize: x / max(||x||, eps); safe gradient at 0 (docs/method.md §9 item 16)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.where(sq > eps * eps, sq, 1.0))
  return x / jnp.where(sq > eps * eps, norm, eps)


def init_cosine(key, num_classes: int, dim: int) -> dict:
  """CosineLinear init: weight U(+-1/sqrt(D)), sigma 1 (docs/method.md §1.6)."""
  return {"weight": torch_linear_init(dim)(key, (num_classes, dim)), "sigma": jnp.ones(())}


def cosine_logits(x, head: dict):
  """sigma * <x/||x||, w_c/||w_c||> over the full vector (CosineLinear.forward)."""
  return head["sigma"] * l2_normalize(x) @ l2_normalize(head["weight"]).T


def reweighted_logits(x, prototypes, section_weights, sigma=1.0):
  """forward_reweight (docs/method.md §4.1): sigma * sum_s w_s cos(x^(s), proto_c^(s)), equal sections.

  x: (B, S*d); prototypes: (C, S*d); section_weights: S floats (outermost section first).
  """
  s = len(section_weights)
  chex.assert_rank([x, prototypes], 2)
  if x.shape[-1] % s or prototypes.shape[-1] != x.shape[-1]:
    raise ValueError(f"features {x.shape} / prototypes {prototypes.shape} do not split into "
                     f"{s} equal sections (section_weights={tuple(section_weights)})")
  xs = l2_normalize(x.reshape(x.shape[0], s, -1))
  ps = l2_normalize(prototypes.reshape(prototypes.shape[0], s, -1))
  cos = jnp.einsum("bsd,csd->bcs", xs, ps)
  return sigma * cos @ jnp.asarray(section_weights, x.dtype)

