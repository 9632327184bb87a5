"""Pretrained-checkpoint loaders: parity with timm's own ViT and .npz loader, every format's
round trip, the key report, position-embedding resizing against torch, and the error cases."""
import os

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


def test_dinov2_style_layerscale_state_dict_matches_timm(tmp_path):
  """A timm ViT with LayerScale (the DINOv2 block: `ls1/ls2.gamma`) and random weights, saved
  as a state dict and loaded into our layerscale ViT, gives timm's pre-logits features."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=4,
                            mlp_ratio=2.0, num_classes=0, global_pool="token",
                            init_values=1.0).eval()
  with torch.no_grad():
    for p in model.parameters():  # every tensor random, LayerScale gammas included
      p.copy_(0.2 * torch.randn_like(p))
  torch.save(model.state_dict(), tmp_path / "ls.pth")
  cfg = vit.get_config("tiny-ls", image_size=28, patch_size=14, hidden_size=64, num_layers=2,
                       num_heads=4, mlp_dim=128)
  params, report = checkpoints.load_pretrained(str(tmp_path / "ls.pth"), cfg)
  assert report["format"] == "timm" and not report["unexpected"], report
  x = np.random.RandomState(5).rand(3, 28, 28, 3).astype(np.float32)
  ref = _timm_features(model, x)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(vit.ViT(cfg).apply({"params": params}, x))
  err = np.abs(ours - ref).max()
  print(f"timm parity (LayerScale state dict): max abs diff {err:.2e}")
  assert err < 1e-5


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


def test_big_vision_without_prefix_and_with_old_posemb_layouts(tmp_path):
  """Plain big_vision param files (no `params/`), the pre-2022 `Transformer/pos_embedding`
  and the old combined CLS+grid posemb (g*g+1 rows, kept as is: big_vision vit.py
  fix_old_checkpoints)."""
  flat = random_flat()
  inv = {v: k for k, v in google_npz._BV_BLOCK.items()}  # pylint: disable=protected-access
  bv = {}
  for k, v in flat.items():
    parts = k.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = inv[parts[2]]
    bv["/".join(parts)] = v
  pe = bv.pop(checkpoints.POSEMB)
  bv["Transformer/pos_embedding"] = pe  # 4*4 + 1 rows: CLS slot included
  np.savez(tmp_path / "old.npz", **bv)
  params, report = checkpoints.load_pretrained(str(tmp_path / "old.npz"), CFG)
  assert report["format"] == "big_vision"
  _equal(params, flat)
  del bv["Transformer/pos_embedding"]
  bv["pos_embedding"] = pe[:, 1:]  # current layout: grid only
  np.savez(tmp_path / "new.npz", **bv)
  params, _ = checkpoints.load_pretrained(str(tmp_path / "new.npz"), CFG)
  np.testing.assert_array_equal(params["Transformer"]["posembed_input"]["pos_embedding"][:, 0], 0)
  flat[checkpoints.POSEMB][:, 0] = 0.0
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
  with pytest.raises(checkpoints.CheckpointError, match="nowhere.npz") as e:
    checkpoints.load_pretrained(str(tmp_path / "nowhere.npz"), CFG)
  assert isinstance(e.value, FileNotFoundError)
  with pytest.raises(checkpoints.CheckpointError, match="unknown checkpoint format"):
    checkpoints.load_pretrained(str(path), CFG, format="keras")


def test_more_layers_in_file_are_reported_as_unexpected(npz_file):
  path, _ = npz_file
  one = vit.get_config("tiny", image_size=32, patch_size=8, hidden_size=64, num_layers=1,
                       num_heads=4, mlp_dim=128)
  _, report = checkpoints.load_pretrained(str(path), one)
  assert report["unexpected"] and all("encoderblock_1" in k for k in report["unexpected"])


def test_explicit_format_that_contradicts_the_file_is_refused(npz_file, tmp_path):
  path, flat = npz_file
  with pytest.raises(checkpoints.CheckpointError, match=r"format='timm'.*'vit_jax'"):
    checkpoints.load_pretrained(str(path), CFG, format="timm")
  with pytest.raises(checkpoints.CheckpointError, match=r"format='ntkcl'"):
    checkpoints.load_pretrained(str(path), CFG, format="ntkcl")
  params, report = checkpoints.load_pretrained(str(path), CFG, format="augreg")
  assert report["format"] == "augreg"  # same layout as vit_jax: accepted and reported as asked
  _equal(params, flat)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(torch_state.from_ours_timm(flat), str(tmp_path / "t.safetensors"))
  with pytest.raises(checkpoints.CheckpointError, match=r"format='hf'.*'timm'"):
    checkpoints.load_pretrained(str(tmp_path / "t.safetensors"), CFG, format="hf")


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_truncated_state_dict_names_the_file(npz_file, tmp_path, ext):
  torch = pytest.importorskip("torch")
  _, flat = npz_file
  sd = torch_state.from_ours_timm(flat)
  good = tmp_path / f"good{ext}"
  if ext == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(sd, str(good))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, good)
  params, _ = checkpoints.load_pretrained(str(good), CFG)
  _equal(params, flat)
  bad = tmp_path / f"cut{ext}"
  bad.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
  with pytest.raises(checkpoints.CheckpointError, match=f"cut{ext}.*corrupt or truncated"):
    checkpoints.load_pretrained(str(bad), CFG)
