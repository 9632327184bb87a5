"""The feature-extraction CLI against a direct `ViT.apply` on the same random checkpoint: any N
(not a batch multiple), normalisation, and resizing to --image_size."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ntkcl_jax import checkpoints, normalization, tree_utils
from ntkcl_jax.models import vit
from ntkcl_jax.tools import extract_features
import _xla  # tests/_xla.py

OVERRIDES = dict(patch_size=8, num_layers=2, hidden_size=64, mlp_dim=128, num_heads=4)
CFG = vit.get_config("tiny", image_size=32, **OVERRIDES)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ckpt(tmp_path):
  rng = np.random.RandomState(0)
  flat = {k: (0.1 * rng.randn(*s)).astype(np.float32)
          for k, s in checkpoints.expected_shapes(CFG).items()}
  path = tmp_path / "ckpt.npz"
  np.savez(path, **flat)
  return path, tree_utils.unflatten(flat)


def direct(params, cfg, x):
  with jax.default_matmul_precision("highest"):
    return np.asarray(vit.ViT(cfg).apply({"params": params}, x))


def run_cli(tmp_path, ckpt_path, x, *extra):
  np.save(tmp_path / "in.npy", x)
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.tools.extract_features",
                      f"--checkpoint={ckpt_path}", "--model=tiny",
                      f"--images={tmp_path / 'in.npy'}", f"--output={tmp_path / 'out.npy'}",
                      "--model_overrides=" + ",".join(f"{k}={v}" for k, v in OVERRIDES.items()),
                      *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS=_xla.flags()))
  assert p.returncode == 0, p.stderr[-3000:]
  return np.load(tmp_path / "out.npy")


def test_cli_matches_direct_apply_for_n_not_a_batch_multiple(ckpt, tmp_path):
  path, params = ckpt
  x = np.random.RandomState(3).rand(7, 32, 32, 3).astype(np.float32)
  got = run_cli(tmp_path, path, x, "--normalize=imagenet", "--batch_size=3")
  assert got.shape == (7, 64) and got.dtype == np.float32
  np.testing.assert_allclose(got, direct(params, CFG, normalization.normalize(x, "imagenet")),
                             atol=1e-4)


def test_cli_resizes_to_image_size(ckpt, tmp_path):
  """40x40 inputs at --image_size=32 give the features of the bilinearly resized images (the
  model keeps its 4x4 position-embedding grid)."""
  path, params = ckpt
  x = np.random.RandomState(4).rand(5, 40, 40, 3).astype(np.float32)
  got = run_cli(tmp_path, path, x, "--normalize=none", "--batch_size=4", "--image_size=32")
  resized = np.asarray(jax.image.resize(x, (5, 32, 32, 3), "linear", antialias=True))
  np.testing.assert_allclose(got, direct(params, CFG, resized), atol=1e-4)


def test_extract_function_padding_does_not_leak_between_images(ckpt):
  """Each output row depends on its own image only: the batched, padded result equals one
  forward pass per image."""
  _, params = ckpt
  x = np.random.RandomState(5).rand(5, 32, 32, 3).astype(np.float32)
  got = extract_features.extract(params, CFG, x, "none", batch_size=4, progress=False)
  one_by_one = np.concatenate([direct(params, CFG, x[i:i + 1]) for i in range(5)])
  np.testing.assert_allclose(got, one_by_one, atol=1e-4)
  assert extract_features.extract(params, CFG, x[:0], "none", 4, progress=False).shape == (0, 64)


def test_bad_inputs_say_what_to_do(ckpt):
  _, params = ckpt
  with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
    extract_features.extract(params, CFG, np.zeros((2, 32, 32), np.float32))
  with pytest.raises(ValueError, match="batch_size"):
    extract_features.extract(params, CFG, np.zeros((2, 32, 32, 3), np.float32), batch_size=0)
