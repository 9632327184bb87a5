r"""Batched-branch forward (vmap over stacked prompt sets) against running the sets one by one.

    python -m benchmarks.branches [--models=tiny,ViT-S/16,ViT-B/16] [--batch=16] [--steps=3]

NTK-CL runs every prompt set of each branch (frozen sets + current) as a separate full ViT pass
(docs/method.md §1.4). `ntkcl.features` batches them with `jax.vmap` over the stacked PEFT trees,
the backbone closed over, so the backbone matmuls of all sets become one larger matmul. The
one-by-one path applies the ViT once per set and concatenates. Both are jitted; timed on random
images, forward only (eval/prototypes) and forward + backward (train), official settings.
The two paths are also checked to give the same features.
"""
from __future__ import annotations

import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax import cli, tree_utils
from ntkcl_jax.models import ntkcl, vit


def one_by_one(spec, backbone, trainable, frozen, images):
  """Same features as ntkcl.features(train=False), each prompt set in its own ViT pass."""
  out = {}
  for b in spec.branches:
    model = spec.vit_module(b)
    n = jax.tree_util.tree_leaves(frozen[b])[0].shape[0] if b in frozen else 0
    sets = [jax.tree_util.tree_map(lambda x, i=i: jax.lax.stop_gradient(x[i]), frozen[b])
            for i in range(n)] + [trainable[b]]
    secs = [model.apply({"params": tree_utils.merge(backbone, s)}, images) for s in sets]
    out[b] = jnp.concatenate(secs, axis=-1)
  return spec.fusion_module().apply({"params": trainable["fusion"]}, out["channel"],
                                    out["patch"], deterministic=True)


def batched(spec, backbone, trainable, frozen, images):
  return ntkcl.features(spec, backbone, trainable, frozen, images, train=False)["fused"]


def timed(fn, args, steps):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def define_model_flags(fv) -> None:
  """--models, --batch, --steps: shared with benchmarks/report.py, which passes them on."""
  flags.DEFINE_string("models", "tiny,ViT-S/16,ViT-B/16", "comma-separated ViT variants",
                      flag_values=fv)
  flags.DEFINE_integer("batch", 16, "images per batch", flag_values=fv)
  flags.DEFINE_integer("steps", 3, "timed steps per path", flag_values=fv)


def define_flags(fv) -> None:
  define_model_flags(fv)


def _main(fv) -> int:
  unknown = [m for m in fv.models.split(",") if m not in vit.variant_names()]
  if unknown:
    raise cli.InputError(f"--models: unknown ViT variants {unknown}; known {vit.variant_names()}")
  if fv.batch < 1 or fv.steps < 1:
    raise cli.InputError("--batch and --steps must be >= 1")
  print(f"{'model':<12} {'path':<12} {'fwd s':>8} {'img/s':>8} {'fwd+bwd s':>10} {'img/s':>8}")
  for name in fv.models.split(","):
    cfg = vit.get_config(name, image_size=32) if name.startswith("tiny") else vit.get_config(name)
    spec = ntkcl.ModelSpec(cfg, method="ntkcl", ffn_num=16, num_prompts=10, frozen_sets=1,
                           section_weights=(0.3, 0.1))
    key = jax.random.PRNGKey(0)
    backbone = vit.init_params(cfg, key)
    trainable, frozen = ntkcl.init_trainable(spec, key), ntkcl.init_frozen(spec, key)
    x = jax.random.uniform(key, (fv.batch, cfg.image_size, cfg.image_size, 3))
    ref = np.asarray(jax.jit(batched, static_argnums=0)(spec, backbone, trainable, frozen, x))
    got = np.asarray(jax.jit(one_by_one, static_argnums=0)(spec, backbone, trainable, frozen, x))
    assert np.allclose(ref, got, rtol=1e-4, atol=1e-4), np.abs(ref - got).max()
    for label, fn in (("vmap", batched), ("one-by-one", one_by_one)):
      fwd = timed(lambda b, t, f, x, fn=fn: fn(spec, b, t, f, x), (backbone, trainable, frozen, x),
                  fv.steps)
      grad = jax.grad(lambda t, b, f, x, fn=fn: jnp.sum(fn(spec, b, t, f, x) ** 2))
      bwd = timed(grad, (trainable, backbone, frozen, x), fv.steps)
      print(f"{name:<12} {label:<12} {fwd:>8.3f} {fv.batch / fwd:>8.1f} {bwd:>10.3f} "
            f"{fv.batch / bwd:>8.1f}", flush=True)
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
