"""The ViT against an independent numpy implementation, closed-form parameter counts, and the
behaviour of its PEFT extension points."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from ntkcl_jax import tree_utils
from ntkcl_jax.models import vit


def _np_layernorm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_vit(params, images, cfg):
  """Reference forward written from the ViT paper / timm conventions, in float64 numpy."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  b, s = images.shape[0], cfg.patch_size
  g = cfg.image_size // s
  patches = images.reshape(b, g, s, g, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  w = p["embedding"]["kernel"].reshape(-1, cfg.hidden_size)  # HWIO flattened in (h, w, c) order
  x = patches @ w + p["embedding"]["bias"]
  x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, cfg.hidden_size)), x], 1)
  x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
  for i in range(cfg.num_layers):
    blk = p["Transformer"][f"encoderblock_{i}"]
    a = blk["MultiHeadDotProductAttention_1"]
    y = _np_layernorm(x, blk["LayerNorm_0"])
    q, k, v = (np.einsum("bnd,dhk->bnhk", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
    wts = np.exp(logits - logits.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", wts, v)
    y = np.einsum("bqhd,hdo->bqo", o, a["out"]["kernel"]) + a["out"]["bias"]
    if cfg.layerscale:
      y = y * blk["LayerScale_1"]["scale"]
    x = x + y
    m = blk["MlpBlock_3"]
    y = _np_layernorm(x, blk["LayerNorm_2"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # exact GELU
    y = y @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"]
    if cfg.layerscale:
      y = y * blk["LayerScale_2"]["scale"]
    x = x + y
  return _np_layernorm(x, p["Transformer"]["encoder_norm"])[:, 0]


def _randomize(params, key, scale=0.2):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [scale * jax.random.normal(k, l.shape) + (l if l.ndim == 1 else 0)
             for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("name", ["tiny", "tiny-ls"])
def test_matches_numpy_reference(name):
  cfg = vit.get_config(name, image_size=16, num_layers=2)
  params = _randomize(vit.init_params(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (3, 16, 16, 3)))
  got = np.asarray(vit.ViT(cfg).apply({"params": params}, x))
  want = _np_vit(params, x.astype(np.float64), cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _closed_form_count(d, depth, mlp, patch, tokens, layerscale):
  block = 4 * d + 3 * (d * d + d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  block += 2 * d if layerscale else 0
  return patch * patch * 3 * d + d + d + tokens * d + depth * block + 2 * d


@pytest.mark.parametrize("name,d,depth,mlp,patch", [
    ("ViT-Ti/16", 192, 12, 768, 16), ("ViT-S/16", 384, 12, 1536, 16),
    ("ViT-B/16", 768, 12, 3072, 16), ("ViT-L/16", 1024, 24, 4096, 16),
    ("DINOv2-S/14", 384, 12, 1536, 14), ("DINOv2-B/14", 768, 12, 3072, 14)])
def test_named_variant_parameter_counts(name, d, depth, mlp, patch):
  cfg = vit.get_config(name)
  shapes = jax.eval_shape(lambda k: vit.init_params(cfg, k), jax.random.PRNGKey(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  tokens = 1 + (224 // patch) ** 2
  assert n == _closed_form_count(d, depth, mlp, patch, tokens, name.startswith("DINOv2"))
  if name == "ViT-B/16":
    assert n == 85_798_656  # timm's vit_base_patch16_224 minus its 769k-parameter head


class _ZeroAdapter(nn.Module):
  layer: int

  @nn.compact
  def __call__(self, h, deterministic):
    w = self.param("w", nn.initializers.zeros, (h.shape[-1],))
    return h * w


class _ExtraToken(nn.Module):
  """Inserts one learned token after CLS at block 0 (no residual for it), keeps it later."""
  layer: int

  @nn.compact
  def __call__(self, h, deterministic):
    if self.layer > 0:
      return h, h
    t = self.param("t", nn.initializers.normal(1.0), (1, 1, h.shape[-1]))
    t = jnp.broadcast_to(t, (h.shape[0], 1, h.shape[-1]))
    z = jnp.concatenate([h[:, :1], t, h[:, 1:]], 1)
    res = jnp.concatenate([h[:, :1], jnp.zeros_like(t), h[:, 1:]], 1)
    return z, res


def test_extension_points_plug_in_without_copying_the_vit():
  cfg = vit.get_config("tiny", num_layers=2)
  key = jax.random.PRNGKey(0)
  base = vit.init_params(cfg, key)
  x = jax.random.uniform(key, (2, 32, 32, 3))
  plain = vit.ViT(cfg).apply({"params": base}, x)

  # A zero adapter beside each MLP: the backbone's features, unchanged.
  adapter, _ = tree_utils.split(vit.init_params(cfg, key, mlp_adapter=_ZeroAdapter),
                                lambda k: "/adapter/" in k)
  assert adapter["Transformer"]["encoderblock_1"]["adapter"]["w"].shape == (64,)
  with_adapter = vit.ViT(cfg, mlp_adapter=_ZeroAdapter)
  np.testing.assert_allclose(with_adapter.apply({"params": tree_utils.merge(base, adapter)}, x),
                             plain, atol=1e-6)

  # A token inserted after CLS: one more token, and the CLS feature now attends to it.
  prompt, _ = tree_utils.split(vit.init_params(cfg, key, token_hook=_ExtraToken),
                               lambda k: "/prompt/" in k)
  hooked = vit.ViT(cfg, token_hook=_ExtraToken)
  variables = {"params": tree_utils.merge(base, prompt)}
  assert hooked.apply(variables, x, return_tokens=True).shape == (2, 1 + 1 + 64, 64)
  assert np.abs(np.asarray(hooked.apply(variables, x)) - np.asarray(plain)).max() > 1e-3


def test_wrong_image_shape_is_a_clear_error():
  cfg = vit.get_config("tiny")
  p = vit.init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="expected images of shape"):
    vit.ViT(cfg).apply({"params": p}, jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit.get_config("ViT-X/3")
  with pytest.raises(ValueError, match="multiple of patch_size"):
    vit.get_config("tiny", image_size=30)
