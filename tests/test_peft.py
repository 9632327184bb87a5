"""PEFT modules and the NTK-CL forward against numpy references and closed forms of docs/method.md."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import tree_utils
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import peft
from ntkcl_jax.models import vit

VCFG = vit.get_config("tiny", image_size=16, patch_size=4, num_layers=2, hidden_size=32,
                      num_heads=2, mlp_dim=64)


def _np_ln(x, g, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * g + b


def _randomize(tree, seed, scale=0.3):
  leaves, tdef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tdef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def setup():
  spec = ntkcl.ModelSpec(VCFG)
  bb = vit.init_params(VCFG, jax.random.PRNGKey(0))
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3))
  return spec, bb, images


def test_channel_adapter_matches_numpy():
  h = np.random.RandomState(0).randn(2, 5, 8).astype(np.float32)
  mod = peft.ChannelAdapter(ffn_num=3, scalar=0.1)
  params = _randomize(mod.init(jax.random.PRNGKey(0), jnp.asarray(h))["params"], 1)
  got = mod.apply({"params": params}, jnp.asarray(h))
  d, u = params["down_proj"], params["up_proj"]
  want = 0.1 * (np.maximum(h @ np.asarray(d["kernel"]) + np.asarray(d["bias"]), 0)
                @ np.asarray(u["kernel"]) + np.asarray(u["bias"]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  init = mod.init(jax.random.PRNGKey(0), jnp.asarray(h))["params"]
  assert np.abs(np.asarray(init["up_proj"]["kernel"])).max() == 0  # docs/method.md §1.2: Up starts at 0
  assert np.abs(np.asarray(init["down_proj"]["kernel"])).max() <= 1 / np.sqrt(8)


@pytest.mark.parametrize("layer,tokens", [(0, 17), (1, 17 + 4), (0, 50), (2, 50 + 4)])
def test_patch_prompt_matches_numpy_any_token_count(layer, tokens):
  p = 4
  h = np.random.RandomState(layer + tokens).randn(2, tokens, 6).astype(np.float32)
  mod = peft.PatchPrompt(layer=layer, num_prompts=p)
  params = _randomize(mod.init(jax.random.PRNGKey(0), jnp.asarray(h))["params"], 2)
  z, res = mod.apply({"params": params}, jnp.asarray(h))
  w = {k: np.asarray(v) for k, v in tree_utils.flatten(params).items()}
  if layer == 0:
    base, old = h, None
  else:
    base, old = np.concatenate([h[:, :1], h[:, 1 + p:]], 1), h[:, 1:1 + p]
  mixed = np.einsum("bnd,np->bpd", base, w["global_patch_prompt/kernel"]) + \
      w["global_patch_prompt/bias"][None, :, None]
  g = _np_ln(mixed, w["prompt_norm/scale"], w["prompt_norm/bias"])
  prompts = g if old is None else g + 0.1 * old
  np.testing.assert_allclose(z, np.concatenate([base[:, :1], prompts, base[:, 1:]], 1),
                             rtol=1e-4, atol=1e-5)
  want_res = (np.concatenate([h[:, :1], np.zeros_like(g), h[:, 1:]], 1) if layer == 0 else h)
  np.testing.assert_allclose(res, want_res, rtol=1e-6)


class _ZeroPrompts(nn.Module):
  """Independent statement of the official init: P zero tokens after CLS, no residual there at
  layer 0, residual = input at later layers (docs/method.md §1.3 'Degeneracy')."""
  layer: int = 0
  p: int = 10

  def __call__(self, h, deterministic=True):
    if self.layer == 0:
      z = jnp.concatenate([h[:, :1], jnp.zeros((h.shape[0], self.p, h.shape[2])), h[:, 1:]], 1)
      return z, z
    r = h[:, 1:1 + self.p]
    return jnp.concatenate([h[:, :1], 0.1 * r, h[:, 1 + self.p:]], 1), h


def test_zero_init_features_vs_backbone(setup):
  """Channel branch at init == PTM; patch branch at init != PTM but == the zero-prompt ViT."""
  spec, bb, images = setup
  tr = ntkcl.init_trainable(spec, jax.random.PRNGKey(2))
  fr = ntkcl.init_frozen(spec, jax.random.PRNGKey(3))
  f = ntkcl.features_jit(spec, bb, tr, fr, images)
  ptm = vit.ViT(VCFG).apply({"params": bb}, images)
  for s in range(2):
    np.testing.assert_allclose(f["channel_sections"][:, s], ptm, atol=1e-5)
  assert np.abs(np.asarray(f["patch_sections"][:, 1] - ptm)).max() > 1e-3
  zero = vit.ViT(VCFG, token_hook=lambda layer, name: _ZeroPrompts(layer=layer, name=name))
  np.testing.assert_allclose(f["patch_sections"][:, 1], zero.apply({"params": bb}, images),
                             atol=1e-5)
  assert f["fused"].shape == (3, 64)


def test_frozen_sections_come_first_and_get_no_gradient(setup):
  spec, bb, images = setup
  tr = _randomize(ntkcl.init_trainable(spec, jax.random.PRNGKey(2)), 4, 0.05)
  fr = _randomize(ntkcl.init_frozen(spec, jax.random.PRNGKey(3)), 5, 0.05)
  f = ntkcl.features_jit(spec, bb, tr, fr, images)
  one = lambda p: vit.ViT(VCFG, mlp_adapter=spec.channel_factory()).apply(
      {"params": tree_utils.merge(bb, p)}, images)
  np.testing.assert_allclose(f["channel"][:, :32],
                             one(jax.tree_util.tree_map(lambda x: x[0], fr["channel"])), atol=1e-5)
  np.testing.assert_allclose(f["channel"][:, 32:], one(tr["channel"]), atol=1e-5)
  g = jax.grad(lambda fz: ntkcl.features_jit(spec, bb, tr, fz, images)["fused"].sum())(fr)
  assert max(np.abs(np.asarray(x)).max() for x in jax.tree_util.tree_leaves(g)) == 0


def test_use_init_ptm_prepends_backbone_section(setup):
  _, bb, images = setup
  spec = ntkcl.ModelSpec(VCFG, use_init_ptm=True, section_weights=(1.0, 0.3, 0.1))
  tr = ntkcl.init_trainable(spec, jax.random.PRNGKey(2))
  fr = ntkcl.init_frozen(spec, jax.random.PRNGKey(3))
  f = ntkcl.features_jit(spec, bb, tr, fr, images)
  np.testing.assert_allclose(f["patch"][:, :32], vit.ViT(VCFG).apply({"params": bb}, images),
                             atol=1e-5)
  assert f["fused"].shape == (3, 96) and tr["fusion"]["value"]["kernel"].shape == (96, 96)


def test_fusion_eval_is_half_vc_plus_c_plus_tenth_p_and_qk_are_dead():
  r = np.random.RandomState(0)
  c, p = r.randn(4, 16).astype(np.float32), r.randn(4, 16).astype(np.float32)
  mod = peft.AttentionFusion(num_heads=8)
  params = mod.init(jax.random.PRNGKey(0), jnp.asarray(c), jnp.asarray(p))["params"]
  got = mod.apply({"params": params}, jnp.asarray(c), jnp.asarray(p))
  v = params["value"]
  want = 0.5 * (c @ np.asarray(v["kernel"]) + np.asarray(v["bias"])) + c + 0.1 * p
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  loss = lambda prm: jnp.sum(jnp.sin(mod.apply({"params": prm}, c, p, deterministic=False,
                                               rngs={"dropout": jax.random.PRNGKey(1)})))
  g = jax.grad(loss)(params)
  for name in ("query", "key"):
    assert np.abs(np.asarray(g[name]["kernel"])).max() == 0.0
  assert np.abs(np.asarray(g["value"]["kernel"])).max() > 0
  # training dropout acts on whole head chunks (8 chunks of 2): scale in {0, 1/0.9}
  tr = mod.apply({"params": params}, c, p, deterministic=False,
                 rngs={"dropout": jax.random.PRNGKey(3)})
  vc = 0.5 * (c @ np.asarray(v["kernel"]) + np.asarray(v["bias"]))
  ratio = ((np.asarray(tr) - c - 0.1 * p) / vc).reshape(4, 8, 2)
  np.testing.assert_allclose(ratio[..., 0], ratio[..., 1], atol=1e-3)
  assert np.all(np.isclose(ratio, 0, atol=1e-3) | np.isclose(ratio, 1 / 0.9, atol=1e-3))
  # corrected fusion: Q and K reach the output
  fixed = peft.AttentionFusion(num_heads=8, multi_token=True)
  g2 = jax.grad(lambda prm: jnp.sum(jnp.sin(fixed.apply({"params": prm}, c, p))))(params)
  assert np.abs(np.asarray(g2["query"]["kernel"])).max() > 0


def test_reweighted_logits_match_numpy():
  r = np.random.RandomState(1)
  x, protos = r.randn(5, 12).astype(np.float32), r.randn(7, 12).astype(np.float32)
  w = (1.0, 0.3, 0.1)
  want = np.zeros((5, 7))
  for s in range(3):
    xs, ps = x[:, 4 * s:4 * s + 4], protos[:, 4 * s:4 * s + 4]
    want += w[s] * (xs / np.linalg.norm(xs, axis=1, keepdims=True)) @ \
        (ps / np.linalg.norm(ps, axis=1, keepdims=True)).T
  np.testing.assert_allclose(peft.reweighted_logits(jnp.asarray(x), jnp.asarray(protos), w),
                             want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="equal sections"):
    peft.reweighted_logits(jnp.asarray(x[:, :11]), jnp.asarray(protos[:, :11]), w)


def test_cosine_logits_match_numpy():
  r = np.random.RandomState(2)
  x = r.randn(3, 6).astype(np.float32)
  head = {"weight": jnp.asarray(r.randn(4, 6), jnp.float32), "sigma": jnp.asarray(2.5)}
  w = np.asarray(head["weight"])
  want = 2.5 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ \
      (w / np.linalg.norm(w, axis=1, keepdims=True)).T
  np.testing.assert_allclose(peft.cosine_logits(jnp.asarray(x), head), want, rtol=1e-5)


def test_vit_b16_trainable_counts_match_spec_table():
  """docs/method.md §1.7, computed with eval_shape only (no weights)."""
  spec = ntkcl.ModelSpec(vit.get_config("ViT-B/16"))
  counts = {k: ntkcl.count_params(v) for k, v in ntkcl.abstract_trainable(spec).items()}
  assert counts["channel"] == 12 * (768 * 16 + 16 + 16 * 768 + 768)
  assert counts["patch"] == 12 * (197 * 10 + 10 + 2 * 768)
  assert counts["fusion"] == 3 * (1536 ** 2 + 1536)


def test_bad_section_weights_raise():
  with pytest.raises(ValueError, match="section_weights"):
    ntkcl.ModelSpec(VCFG, section_weights=(1.0,))


def test_plain_fusion_alternatives_match_numpy():
  r = np.random.RandomState(3)
  c, p = r.randn(3, 6).astype(np.float32), r.randn(3, 6).astype(np.float32)
  relu = lambda x: np.maximum(x, 0)
  mlp = peft.FusionNetwork()
  prm = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in
         mlp.init(jax.random.PRNGKey(0), c, p)["params"].items()}
  want = 0.5 * relu(np.concatenate([c, p], -1) @ prm["fc1"]["kernel"] + prm["fc1"]["bias"]) + c + p
  np.testing.assert_allclose(mlp.apply({"params": prm}, c, p), want, rtol=1e-5, atol=1e-6)
  mm = peft.MultimodalFusion()
  prm = jax.tree_util.tree_map(np.asarray, mm.init(jax.random.PRNGKey(1), c, p)["params"])
  inter = relu((c * p) @ prm["fc1"]["kernel"] + prm["fc1"]["bias"]) * prm["interact"]
  want = 0.1 * relu(np.concatenate([c, p, inter], -1) @ prm["fc2"]["kernel"] +
                    prm["fc2"]["bias"]) + c + p
  np.testing.assert_allclose(mm.apply({"params": prm}, c, p), want, rtol=1e-5, atol=1e-6)
  spec = ntkcl.ModelSpec(VCFG, fusion="mlp")
  assert set(ntkcl.abstract_trainable(spec)["fusion"]) == {"fc1"}
  with pytest.raises(ValueError, match="unknown fusion"):
    ntkcl.ModelSpec(VCFG, fusion="vae")
