"""Tiny models shared by the ntk_analysis tests: a frozen tiny ViT with NTK-CL channel adapters."""
import dataclasses

import jax
import jax.numpy as jnp

from ntkcl_jax import tree_utils
from ntkcl_jax.models import ntkcl, vit


def tiny_vit_adapter():
  """(make_f, peft params, x): make_f(dtype) -> f(peft, x) -> (N, O=5) logits of a fixed head."""
  cfg = vit.get_config("tiny", image_size=8, patch_size=4, hidden_size=16, num_layers=2,
                       num_heads=2, mlp_dim=32)
  spec = ntkcl.ModelSpec(cfg, method="channel", ffn_num=4, frozen_sets=0, section_weights=(1.0,))
  key = jax.random.PRNGKey(0)
  backbone = vit.init_params(cfg, key)
  peft = ntkcl.init_trainable(spec, key)["channel"]
  peft = jax.tree_util.tree_map(  # non-zero up-projections so every group has gradient
      lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), peft)
  head = jax.random.normal(jax.random.PRNGKey(3), (16, 5))

  def make_f(dtype=jnp.float32):
    s = dataclasses.replace(spec, vit=dataclasses.replace(cfg, dtype=dtype))
    model = s.vit_module("channel")
    bb = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), backbone)
    return lambda p, x: model.apply({"params": tree_utils.merge(bb, p)}, x) @ head.astype(dtype)
  x = jax.random.uniform(jax.random.PRNGKey(4), (6, 8, 8, 3))
  return make_f, peft, x
