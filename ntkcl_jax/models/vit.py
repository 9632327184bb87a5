"""One Flax (Linen) Vision Transformer, with extension points for PEFT modules.

Parameter names follow Google's vit_jax checkpoints one to one (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_1/{query,key,value,out}`, `LayerNorm_2`, `MlpBlock_3/Dense_{0,1}`,
`Transformer/encoder_norm`, `head`), so the `.npz` files load without renaming.

Numerics follow the reference ViTs (docs/method.md §1.1): pre-norm blocks, separate q/k/v with
bias, exact (erf) GELU, LayerNorm eps 1e-6, CLS token prepended, learned position embedding added
once at the input, feature = CLS token after the final LayerNorm. DINOv2 adds LayerScale.

Extension points (no second copy of the ViT is ever needed):
  * `mlp_adapter`: a module factory; block i builds `mlp_adapter(layer=i, name='adapter')` and adds
    `adapter(h, deterministic)` to the block output, where h = x + Attn(LN1(x)) (AdaptFormer-style
    parallel adapter, docs/method.md §1.2).
  * `token_hook`: a module factory; block i builds `token_hook(layer=i, name='prompt')` and calls
    `hook(h, deterministic) -> (mlp_input, residual)`; the block output is
    `residual + MLP(LN2(mlp_input))`. This is where generated prompt tokens are inserted after CLS
    (docs/method.md §1.3); the token count may change from block to block.

Compute policy (docs/design.md, "Precision, fused attention and remat"): `dtype` is the compute
dtype of every layer (parameters stay float32: flax `param_dtype`); the attention softmax runs in
at least float32; every matmul runs at `matmul_precision`; `attention='fused'` uses
`jax.nn.dot_product_attention` (cuDNN flash attention on a GPU in bf16/fp16:
attention_implementation); `remat` recomputes each block's activations in the backward pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleFactory = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a ViT. `image_size` fixes the position-embedding grid."""
  name: str = "custom"
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layerscale: bool = False
  ln_eps: float = 1e-6
  num_classes: int = 0  # 0: no head, the output is the pre-logits feature.
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32.
  # 'highest' by default so that TPU (bf16 passes) and GPU (TF32) match the CPU parity tests;
  # None leaves JAX's own default (see precision_context).
  matmul_precision: Optional[str] = "highest"
  attention: str = "einsum"  # einsum (the official code's op order) | fused (dot_product_attention)
  remat: bool = False        # recompute each block's activations in the backward pass

  def __post_init__(self):
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))  # hashable, prints as 'bfloat16'
    if not jnp.issubdtype(self.dtype, jnp.floating):
      raise ValueError(f"ViT dtype must be a floating dtype, got {self.dtype}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTIONS}")
    check_matmul_precision(self.matmul_precision)
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def num_tokens(self) -> int:
    """Tokens entering block 0: CLS plus one per patch (197 for ViT-B/16 at 224 px)."""
    return 1 + self.num_patches

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


ATTENTIONS = ("einsum", "fused")
FLASH_DTYPES = ("bfloat16", "float16")  # what cuDNN's fused attention kernels take


def attention_implementation(platform: str, dtype, head_dim: int) -> tuple[str, str]:
  """(implementation, why) of attention='fused': cuDNN flash attention where it applies (a GPU,
  bf16/fp16 compute, a head dimension that is a multiple of 8 and at most 128), XLA's own fused
  path otherwise. jax.nn.dot_product_attention's `implementation=None` always takes XLA's path
  in jax 0.10, so the choice is made here."""
  name = jnp.dtype(dtype).name
  if platform != "gpu":
    return "xla", f"no GPU ({platform})"
  if name not in FLASH_DTYPES:
    return "xla", f"compute dtype {name} (cuDNN flash attention takes {FLASH_DTYPES})"
  if head_dim % 8 or head_dim > 128:
    return "xla", f"head dimension {head_dim} (cuDNN needs a multiple of 8, at most 128)"
  return "cudnn", f"GPU, {name} compute, head dimension {head_dim}"


def check_matmul_precision(precision: Optional[str]) -> None:
  """Raises a ValueError naming the accepted values unless JAX accepts `precision`."""
  if precision is None:
    return
  try:
    with jax.default_matmul_precision(precision):
      pass
  except (ValueError, TypeError) as e:
    raise ValueError(f"matmul_precision={precision!r} is not accepted by JAX ({e}); use e.g. "
                     "'highest', 'high', 'default', 'bfloat16', 'tensorfloat32' or 'float32'"
                     ) from e


def precision_context(precision: Optional[str]):
  """Context that traces every matmul inside at `precision` (a no-op for None).

  `jax.default_matmul_precision` is read when a dot is traced and stored in it, so the backward
  dots that autodiff builds from a forward dot keep the precision even outside the context.
  """
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def softmax_dtype(dtype) -> jnp.dtype:
  """At least float32: softmax and the losses never run in bf16 (float64 stays float64)."""
  return jnp.promote_types(dtype, jnp.float32)


# width, depth, heads, mlp, patch, layerscale
_VARIANTS = {
    "ViT-Ti/16": (192, 12, 3, 768, 16, False),
    "ViT-S/16": (384, 12, 6, 1536, 16, False),
    "ViT-B/16": (768, 12, 12, 3072, 16, False),
    "ViT-L/16": (1024, 24, 16, 4096, 16, False),
    "DINOv2-S/14": (384, 12, 6, 1536, 14, True),
    "DINOv2-B/14": (768, 12, 12, 3072, 14, True),
    # CPU-sized models for tests and quick experiments (override image/patch/width/depth freely).
    "tiny": (64, 4, 4, 128, 4, False),
    "tiny-ls": (64, 4, 4, 128, 4, True),
}


def variant_names() -> list[str]:
  return sorted(_VARIANTS)


def get_config(name: str, **overrides) -> ViTConfig:
  """Named ViT shape, e.g. get_config('ViT-B/16') or get_config('tiny', image_size=32, num_layers=2)."""
  if name not in _VARIANTS:
    raise ValueError(f"unknown ViT variant {name!r}; known: {variant_names()}")
  width, depth, heads, mlp, patch, ls = _VARIANTS[name]
  base = dict(name=name, hidden_size=width, num_layers=depth, num_heads=heads, mlp_dim=mlp,
              patch_size=patch, layerscale=ls, image_size=32 if name.startswith("tiny") else 224)
  base.update(overrides)
  return ViTConfig(**base)


def gelu_exact(x):
  """x * Phi(x) in the erf form PyTorch's nn.GELU uses; on XLA:CPU this is faster than jax.nn.gelu's
  erfc form (benchmarks/train_step.py: ViT-B/16 forward + backward about 5% faster)."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class MlpBlock(nn.Module):
  """The block's MLP: Dense(mlp_dim) -> exact GELU -> Dense(D)."""
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = gelu_exact(nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="Dense_1")(h)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value (kernels (D, heads, head_dim)).

  attention='einsum': explicit logits and softmax, the official code's order of operations.
  attention='fused': `jax.nn.dot_product_attention` with cuDNN flash attention where it applies
  and XLA's fused path elsewhere (attention_implementation).
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    hd = d // self.num_heads
    proj = lambda name: nn.DenseGeneral((self.num_heads, hd), dtype=self.dtype, name=name)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # (B, N, H, hd)
    if self.attention == "fused":
      impl, _ = attention_implementation(jax.default_backend(), self.dtype, hd)
      out = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, implementation=impl)
    else:
      # Scaling q (B*N*hd values) rather than the logits (B*H*N*N) saves an elementwise pass each
      # way; with hd = 64 the factor is a power of two, so the result is bit-identical.
      q = q * jnp.asarray(hd ** -0.5, q.dtype)
      sm = softmax_dtype(q.dtype)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=sm)
      weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class LayerScale(nn.Module):
  """DINOv2 per-channel residual scale."""
  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * scale.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Pre-norm block: h = x + Attn(LN1 x); out = residual + MLP(LN2 z) [+ adapter(h)]."""
  config: ViTConfig
  layer: int
  mlp_adapter: Optional[ModuleFactory] = None
  token_hook: Optional[ModuleFactory] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    ln = lambda name: nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.dtype, name=name)
    y = SelfAttention(cfg.num_heads, cfg.dtype, cfg.attention,
                      name="MultiHeadDotProductAttention_1")(ln("LayerNorm_0")(x))
    if cfg.layerscale:
      y = LayerScale(name="LayerScale_1")(y)
    h = x + y
    mlp_in, residual = h, h
    if self.token_hook is not None:
      mlp_in, residual = self.token_hook(layer=self.layer, name="prompt")(h, deterministic)
    y = MlpBlock(cfg.mlp_dim, cfg.dtype, name="MlpBlock_3")(ln("LayerNorm_2")(mlp_in))
    if cfg.layerscale:
      y = LayerScale(name="LayerScale_2")(y)
    out = residual + y
    if self.mlp_adapter is not None:
      out = out + self.mlp_adapter(layer=self.layer, name="adapter")(h, deterministic)
    return out


class AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x):
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """Position embedding, the blocks (each under nn.remat when config.remat), final LayerNorm."""
  config: ViTConfig
  mlp_adapter: Optional[ModuleFactory] = None
  token_hook: Optional[ModuleFactory] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = AddPositionEmbs(name="posembed_input")(x)
    # remat keeps only each block's input for the backward pass; `deterministic` (argument 2,
    # counting self) is a Python bool that selects code paths, so it must stay static.
    block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.config.remat else EncoderBlock
    for i in range(self.config.num_layers):
      x = block(self.config, i, self.mlp_adapter, self.token_hook,
                name=f"encoderblock_{i}")(x, deterministic)
    return nn.LayerNorm(epsilon=self.config.ln_eps, dtype=self.config.dtype,
                        name="encoder_norm")(x)


class ViT(nn.Module):
  """images (B, H, W, 3), already normalised -> CLS feature (B, D) in config.dtype, or logits (at
  least float32) if num_classes > 0."""
  config: ViTConfig
  mlp_adapter: Optional[ModuleFactory] = None
  token_hook: Optional[ModuleFactory] = None

  @nn.compact
  def __call__(self, images, *, deterministic: bool = True, return_tokens: bool = False):
    with precision_context(self.config.matmul_precision):
      return self._forward(images, deterministic, return_tokens)

  def _forward(self, images, deterministic, return_tokens):
    cfg = self.config
    chex.assert_rank(images, 4)
    if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"{cfg.name}: expected images of shape (B, {cfg.image_size}, "
                       f"{cfg.image_size}, 3), got {images.shape}; resize the inputs or build the "
                       f"model with image_size={images.shape[1]} (position embeddings are resized "
                       f"by ntkcl_jax.checkpoints)")
    x = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                strides=(cfg.patch_size, cfg.patch_size), padding="VALID", dtype=cfg.dtype,
                name="embedding")(images.astype(cfg.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.hidden_size)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size)), x], 1)
    tokens = Encoder(cfg, self.mlp_adapter, self.token_hook, name="Transformer")(x, deterministic)
    if return_tokens:
      return tokens
    feature = tokens[:, 0]
    if cfg.num_classes:
      return nn.Dense(cfg.num_classes, dtype=softmax_dtype(cfg.dtype), name="head")(feature)
    return feature


def init_params(config: ViTConfig, key: jax.Array, **module_kwargs) -> dict:
  """Random parameters of a ViT (with whatever PEFT modules module_kwargs plug in)."""
  model = ViT(config, **module_kwargs)
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.jit(model.init)(key, x)["params"]
