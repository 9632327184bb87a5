"""Pretrained-checkpoint loaders: parity with timm's own ViT and .npz loader, every format's
round trip, the key report, position-embedding resizing against torch, and the error cases."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ntkcl_jax import checkpoints, tree_utils
from ntkcl_jax.checkpoints import google_npz, posemb, torch_state
from ntkcl_jax.models import vit

CFG = vit.get_config("tiny", image_size=32, patch_size=8, hidden_size=64, num_layers=2,
                     num_heads=4, mlp_dim=128)


def random_flat(cfg=CFG, seed=0):
  """Our flat parameter names with random values (every tensor non-trivial)."""
  shapes = checkpoints.expected_shapes(cfg)
  rng = np.random.RandomState(seed)
  return {k: (0.1 * rng.randn(*s)).astype(np.float32) for k, s in shapes.items()}


def apply(flat, cfg, x):
  with jax.default_matmul_precision("highest"):
    return np.asarray(vit.ViT(cfg).apply({"params": tree_utils.unflatten(flat)}, x))


@pytest.fixture
def npz_file(tmp_path):
  flat = random_flat()
  path = tmp_path / "vit_jax.npz"
  np.savez(path, **flat)
  return path, flat


# -- parity with timm ------------------------------------------------------------------------
def _timm_model():
  timm = pytest.importorskip("timm")
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  del timm
  return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                           mlp_ratio=2.0, num_classes=0, global_pool="token").eval()


def _timm_features(model, x):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    t = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
    return model.forward_head(model.forward_features(t), pre_logits=True).numpy()


def test_features_equal_timm_loading_the_same_google_npz(npz_file):
  from timm.models.vision_transformer import _load_weights  # pylint: disable=g-import-not-at-top
  path, _ = npz_file
  model = _timm_model()
  _load_weights(model, str(path))
  params, report = checkpoints.load_pretrained(str(path), CFG)
  assert report["format"] == "vit_jax" and not report["missing"] and not report["unexpected"]
  x = np.random.RandomState(1).rand(4, 32, 32, 3).astype(np.float32)
  ref = _timm_features(model, x)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(vit.ViT(CFG).apply({"params": params}, x))
  err = np.abs(ours - ref).max()
  print(f"timm parity (Google npz): max abs diff {err:.2e}")
  assert err < 1e-5


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_timm_state_dict_loads_to_the_same_features(npz_file, tmp_path, ext):
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import _load_weights  # pylint: disable=g-import-not-at-top
  path, _ = npz_file
  model = _timm_model()
  _load_weights(model, str(path))
  sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  out = tmp_path / f"timm{ext}"
  if ext == ".safetensors":
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file(sd, str(out))
  else:
    torch.save(sd, out)
  params, report = checkpoints.load_pretrained(str(out), CFG)
  assert report["format"] == "timm" and not report["missing"], report
  x = np.random.RandomState(2).rand(2, 32, 32, 3).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(vit.ViT(CFG).apply({"params": params}, x))
  assert np.abs(ours - _timm_features(model, x)).max() < 1e-5


# -- round trips -----------------------------------------------------------------------------
def _equal(params, flat):
  got = tree_utils.flatten(params)
  assert sorted(got) == sorted(flat)
  for k in flat:
    np.testing.assert_allclose(np.asarray(got[k]), flat[k], rtol=0, atol=1e-7, err_msg=k)


def test_round_trip_ours(tmp_path):
  flat = random_flat()
  path = checkpoints.save_ntkcl(str(tmp_path / "ours.npz"), tree_utils.unflatten(flat), CFG,
                                {"source": "test"})
  params, report = checkpoints.load_pretrained(path, CFG)
  assert report["format"] == "ntkcl" and report["meta"]["source"] == "test"
  _equal(params, flat)


def test_round_trip_pre_linen_optimizer_prefix(tmp_path):
  flat = random_flat()
  path = tmp_path / "old.npz"
  np.savez(path, **{"opt/target/" + k: v for k, v in flat.items()},
           **{"pre_logits/kernel": np.zeros((64, 64), np.float32)})
  params, report = checkpoints.load_pretrained(str(path), CFG)
  assert report["unexpected"] == ["pre_logits/kernel"]
  _equal(params, flat)


def test_round_trip_big_vision_including_scanned_blocks(tmp_path):
  flat = random_flat()
  inv = {v: k for k, v in google_npz._BV_BLOCK.items()}  # pylint: disable=protected-access
  bv = {}
  for k, v in flat.items():
    if k == checkpoints.POSEMB:
      continue
    parts = k.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = inv[parts[2]]
    bv["params/" + "/".join(parts)] = v
  flat[checkpoints.POSEMB][:, 0] = 0.0  # big_vision has no CLS position
  bv["params/pos_embedding"] = flat[checkpoints.POSEMB][:, 1:]
  np.savez(tmp_path / "bv.npz", **bv)
  params, report = checkpoints.load_pretrained(str(tmp_path / "bv.npz"), CFG)
  assert report["format"] == "big_vision"
  _equal(params, flat)
  # scanned: one encoderblock with a leading layer axis
  scanned = {k: v for k, v in bv.items() if "encoderblock_" not in k}
  for k in [k for k in bv if "encoderblock_0/" in k]:
    scanned[k.replace("encoderblock_0", "encoderblock")] = np.stack(
        [bv[k], bv[k.replace("encoderblock_0", "encoderblock_1")]])
  np.savez(tmp_path / "scan.npz", **scanned)
  params, _ = checkpoints.load_pretrained(str(tmp_path / "scan.npz"), CFG)
  _equal(params, flat)


def test_round_trip_timm_and_hf_names(tmp_path):
  flat = random_flat(vit.get_config("tiny-ls", image_size=32, patch_size=8, hidden_size=64,
                                    num_layers=2, num_heads=4, mlp_dim=128))
  cfg = vit.get_config("tiny-ls", image_size=32, patch_size=8, hidden_size=64, num_layers=2,
                       num_heads=4, mlp_dim=128)
  sd = torch_state.from_ours_timm(flat)
  assert "blocks.1.ls2.gamma" in sd and sd["blocks.0.attn.qkv.weight"].shape == (192, 64)
  _equal(tree_utils.unflatten(torch_state.to_ours(sd, 4)), flat)
  # Hugging Face Dinov2 names for the same tensors
  hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "embeddings.mask_token": np.zeros((1, 64), np.float32),
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
  for i in range(2):
    b, h = f"blocks.{i}.", f"encoder.layer.{i}."
    q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
    bq, bk, bv = np.split(sd[b + "attn.qkv.bias"], 3)
    for n, w, bb in (("query", q, bq), ("key", k, bk), ("value", v, bv)):
      hf[h + f"attention.attention.{n}.weight"], hf[h + f"attention.attention.{n}.bias"] = w, bb
    hf[h + "attention.output.dense.weight"] = sd[b + "attn.proj.weight"]
    hf[h + "attention.output.dense.bias"] = sd[b + "attn.proj.bias"]
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2")):
      hf[h + theirs + ".weight"], hf[h + theirs + ".bias"] = sd[b + ours + ".weight"], sd[
          b + ours + ".bias"]
    hf[h + "layer_scale1.lambda1"], hf[h + "layer_scale2.lambda1"] = sd[b + "ls1.gamma"], sd[
        b + "ls2.gamma"]
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"dinov2." + k: np.ascontiguousarray(v) for k, v in hf.items()},
            str(tmp_path / "hf.safetensors"))
  params, report = checkpoints.load_pretrained(str(tmp_path / "hf.safetensors"), cfg)
  assert report["format"] == "hf" and report["unexpected"] == ["torch:embeddings.mask_token"]
  _equal(params, flat)


# -- position embeddings ---------------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out", [(14, 7), (37, 16), (4, 9), (5, 5)])
def test_posemb_resize_equals_torch_bicubic(n_in, n_out):
  torch = pytest.importorskip("torch")
  pe = np.random.RandomState(0).randn(1, 1 + n_in * n_in, 8).astype(np.float32)
  ours = posemb.resize_posemb(pe, n_out)
  grid = torch.from_numpy(pe[0, 1:].reshape(1, n_in, n_in, 8)).permute(0, 3, 1, 2).double()
  ref = torch.nn.functional.interpolate(grid, size=(n_out, n_out), mode="bicubic",
                                        align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
  np.testing.assert_allclose(ours[:, 1:], ref.numpy(), atol=1e-5)
  np.testing.assert_array_equal(ours[:, :1], pe[:, :1])


def test_loading_into_another_image_size_resizes_and_reports(npz_file):
  path, flat = npz_file
  cfg48 = vit.get_config("tiny", image_size=48, patch_size=8, hidden_size=64, num_layers=2,
                         num_heads=4, mlp_dim=128)
  params, report = checkpoints.load_pretrained(str(path), cfg48)
  assert report["resized"] == "4x4 -> 6x6"
  np.testing.assert_allclose(params["Transformer"]["posembed_input"]["pos_embedding"],
                             posemb.resize_posemb(flat[checkpoints.POSEMB], 6), atol=1e-7)


# -- errors ----------------------------------------------------------------------------------
def test_truncated_file_names_the_file(npz_file, tmp_path):
  path, _ = npz_file
  bad = tmp_path / "truncated.npz"
  bad.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
  with pytest.raises(checkpoints.CheckpointError, match="truncated.npz.*corrupt or truncated"):
    checkpoints.load_pretrained(str(bad), CFG)


def test_shape_mismatch_names_key_and_shapes(npz_file):
  path, _ = npz_file
  wide = vit.get_config("tiny", image_size=32, patch_size=8, hidden_size=64, num_layers=2,
                        num_heads=4, mlp_dim=256)
  with pytest.raises(checkpoints.CheckpointError, match=r"Dense_0/bias.*\(128,\).*\(256,\)"):
    checkpoints.load_pretrained(str(path), wide)


def test_missing_key_and_missing_file_and_unknown_format(npz_file, tmp_path):
  path, flat = npz_file
  del flat["Transformer/encoder_norm/scale"]
  np.savez(tmp_path / "partial.npz", **flat)
  with pytest.raises(checkpoints.CheckpointError, match="encoder_norm/scale"):
    checkpoints.load_pretrained(str(tmp_path / "partial.npz"), CFG)
  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    checkpoints.load_pretrained(str(tmp_path / "nowhere.npz"), CFG)
  with pytest.raises(checkpoints.CheckpointError, match="unknown checkpoint format"):
    checkpoints.load_pretrained(str(path), CFG, format="keras")


def test_more_layers_in_file_are_reported_as_unexpected(npz_file):
  path, _ = npz_file
  one = vit.get_config("tiny", image_size=32, patch_size=8, hidden_size=64, num_layers=1,
                       num_heads=4, mlp_dim=128)
  _, report = checkpoints.load_pretrained(str(path), one)
  assert report["unexpected"] and all("encoderblock_1" in k for k in report["unexpected"])


# -- feature extraction tool -----------------------------------------------------------------
def test_extract_features_cli_matches_direct_apply(npz_file, tmp_path):
  path, flat = npz_file
  x = np.random.RandomState(3).rand(7, 32, 32, 3).astype(np.float32)  # 7: not a batch multiple
  np.save(tmp_path / "in.npy", x)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.tools.extract_features",
                      f"--checkpoint={path}", "--model=tiny", f"--images={tmp_path / 'in.npy'}",
                      f"--output={tmp_path / 'out.npy'}", "--normalize=none", "--batch_size=3",
                      "--model_overrides=patch_size=8,num_layers=2,hidden_size=64,mlp_dim=128"],
                     cwd=root, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS=""))
  assert p.returncode == 0, p.stderr[-3000:]
  got = np.load(tmp_path / "out.npy")
  assert got.shape == (7, 64) and got.dtype == np.float32
  np.testing.assert_allclose(got, apply(flat, CFG, x), atol=1e-4)
