"""Image sources (folders, ZIPs, tfds mock data, offline archives) and the official transforms."""
import hashlib
import io
import json
import os
import socket
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from ntkcl_jax import data as data_lib
from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax.data import benchmarks, sources, summary, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, source, num_classes, data_dir="", size=16, init=2, inc=2):
  c = config_files.load_config_file("configs/tiny.py")
  c.model.image_size = size
  c.data.name, c.data.source, c.data.data_dir = name, source, data_dir
  c.data.num_classes, c.data.init_cls, c.data.increment = num_classes, init, inc
  c.data.max_per_class_train = c.data.max_per_class_test = 0
  c.data.train_transform = "official"
  return c


def _png(rng, h=10, w=14) -> bytes:
  buf = io.BytesIO()
  Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _write_folder(root, classes, per_train, per_test, seed=0):
  rng = np.random.RandomState(seed)
  for split, n in (("train", per_train), ("test", per_test)):
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for k in range(n):
        with open(os.path.join(root, split, c, f"{k:03d}.png"), "wb") as f:
          f.write(_png(rng))


# -- official folder layout ----------------------------------------------------------------------
def test_folder_layout_alphabetical_classes_and_counts(tmp_path):
  # Kvasir: `Kvasir/{train,test}/<class>/` under data_dir, ImageFolder (alphabetical) class ids.
  names = ["polyps", "dyed-lifted-polyps", "normal-cecum", "esophagitis", "ulcerative-colitis",
           "normal-pylorus", "dyed-resection-margins", "normal-z-line"]
  _write_folder(tmp_path / "Kvasir", names, per_train=3, per_test=2)
  s = data_lib.build_stream(_config("kvasir", "folder", 8, str(tmp_path)))
  assert s.train_set.class_names == sorted(names)
  assert np.bincount(s.train_set.labels).tolist() == [3] * 8
  assert s.counts == {"train": [6] * 4, "test": [4] * 4}
  assert "Kvasir" in s.description
  # An image is the PNG's pixels (decoded, RGB).
  i = s.train_set.names.index("dyed-lifted-polyps/001.png")
  want = np.asarray(Image.open(tmp_path / "Kvasir/train/dyed-lifted-polyps/001.png"))
  np.testing.assert_array_equal(s.train_set.image(i), want)
  b = next(iter(s.train_batches(0, 0, 4)))
  assert b["image"].shape == (4, 16, 16, 3)
  # show_split lists the same counts without decoding images.
  out = summary.split_summary(_config("kvasir", "folder", 8, str(tmp_path)))
  assert out["counts"] == s.counts and "no image decoded" in out["counts_from"]
  assert out["class_order"] == s.class_order.tolist()


def test_missing_folder_names_expected_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"imagenet-r/train/<class>/<image>.*200 class"):
    data_lib.build_stream(_config("imagenet_r", "folder", 200, str(tmp_path)))


def test_unreadable_image_names_the_file(tmp_path):
  _write_folder(tmp_path / "EuroSAT", [f"c{k}" for k in range(10)], 1, 1)
  bad = tmp_path / "EuroSAT" / "train" / "c3" / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  s = data_lib.build_stream(_config("eurosat", "folder", 10, str(tmp_path)))
  with pytest.raises(data_lib.DataError, match="broken.jpg.*remove or replace"):
    for t in range(s.num_tasks):
      list(s.train_batches(t, 0, 2))


def test_empty_class_folder_is_an_error(tmp_path):
  _write_folder(tmp_path / "PlantVillage", [f"c{k:02d}" for k in range(15)], 1, 1)
  for f in (tmp_path / "PlantVillage" / "test" / "c07").iterdir():
    f.unlink()
  # c07 stays a class folder in test but has no image: named, instead of shifting later ids.
  with pytest.raises(data_lib.DataError, match=r"PlantVillage/test: class folder\(s\) \['c07'\] "
                     "contain no images"):
    data_lib.build_stream(_config("plantvillage", "folder", 15, str(tmp_path), init=3, inc=3))
  # Without the folder, test has 14 classes: train/test class sets differ.
  (tmp_path / "PlantVillage" / "test" / "c07").rmdir()
  with pytest.raises(data_lib.DataError, match=r"only in train: \['c07'\]"):
    data_lib.build_stream(_config("plantvillage", "folder", 15, str(tmp_path), init=3, inc=3))
  with pytest.raises(data_lib.DataError, match="different class folders"):
    summary.split_summary(_config("plantvillage", "folder", 15, str(tmp_path), init=3, inc=3))


# -- ZIP archives and the sha256 manifest --------------------------------------------------------
def _write_zip_set(root, name="myset"):
  rng = np.random.RandomState(1)
  os.makedirs(root / name)
  for fname, n in (("train.zip", 2), ("val.zip", 1)):
    with zipfile.ZipFile(root / name / fname, "w", zipfile.ZIP_STORED) as zf:
      for c in range(10):
        for k in range(n):
          zf.writestr(f"n{c:02d}/{k}.png", _png(rng))
  return root / name


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_zip_source_verifies_sha256_and_caches(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  d = _write_zip_set(tmp_path)
  manifest = {f"myset/{f}": {"sha256": _sha(d / f)} for f in ("train.zip", "val.zip")}
  (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
  s = data_lib.build_stream(_config("imagenette_zip", "zip", 10, str(d)))
  assert len(s.train_set) == 20 and len(s.test_set) == 10
  assert "sha256 verified" in s.description
  (tmp_path / "MANIFEST.json").rename(tmp_path / "elsewhere.json")
  s = data_lib.build_stream(_config("imagenette_zip", "zip", 10, str(d)))
  assert "sha256 not checked" in s.description
  (tmp_path / "elsewhere.json").rename(tmp_path / "MANIFEST.json")
  stamps = os.listdir(tmp_path / "home" / ".cache" / "ntkcl_jax" / "verified")
  assert sorted(stamps) == sorted(v["sha256"] + ".ok" for v in manifest.values())
  # A changed archive no longer matches its manifest entry.
  manifest["myset/val.zip"]["sha256"] = "0" * 64
  (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
  with pytest.raises(data_lib.DataError, match="does not match.*copy it again"):
    data_lib.build_stream(_config("imagenette_zip", "zip", 10, str(d)))


def test_missing_zip_names_the_archives(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"\['train.zip', 'test.zip'\]"):
    data_lib.build_stream(_config("cifar10_zip", "zip", 10, str(tmp_path)))


# -- tfds builders under tfds.testing.mock_data -------------------------------------------------
TFDS_SETS = [(n, ds.num_classes) for n, ds in benchmarks.DATASETS.items() if ds.tfds]


def test_every_benchmark_has_a_source():
  for name in ("cifar100", "imagenet_r", "imagenet_a", "domainnet", "oxford_pets", "eurosat",
               "plantvillage", "vtab", "kvasir"):
    ds = benchmarks.get(name)
    assert ds.folder or ds.tfds, name


@pytest.mark.parametrize("name,num_classes", TFDS_SETS)
def test_mock_tfds_stream(name, num_classes):
  c = _config(name, "mock", num_classes, init=max(1, num_classes // 5),
              inc=max(1, num_classes // 5))
  s = data_lib.build_stream(c)
  assert s.num_classes == num_classes and "mock" in s.description
  assert sum(s.counts["train"]) == len(s.train_set)
  for task in (0, s.num_tasks - 1):
    b = next(iter(s.train_batches(task, 0, 4)))
    assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["image"]).all()
    assert set(b["label"].tolist()) <= set(s.tasks[task])
  e = next(iter(s.eval_batches("test", s.tasks[0], 4)))
  assert e["image"].shape == (4, 16, 16, 3)


def test_missing_tfds_data_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"tfds build cifar100 --data_dir={tmp_path} "
                     "--file_format=array_record"):
    sources.tfds_images("cifar100", "train", str(tmp_path), download=False)


def test_tfds_download_host_that_does_not_answer_fails_fast(tmp_path, monkeypatch):
  """A dataset that is not prepared is downloaded only after its host answered: a host that
  hangs (name lookup or connect) is one line within the timeout, naming the dataset, the folder
  and the command that prepares it there; no download starts."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  calls = []
  real_source = tfds.data_source

  def recording_source(*args, **kwargs):
    calls.append(kwargs["download"])
    return real_source(*args, **kwargs)

  def hang(*args, **kwargs):
    time.sleep(5)
    raise OSError("no answer")
  monkeypatch.setattr(tfds, "data_source", recording_source)
  monkeypatch.setattr(socket, "create_connection", hang)
  t0 = time.time()
  with pytest.raises(data_lib.DataError) as e:
    sources.tfds_images("cifar100", "train", str(tmp_path), connect_timeout=0.5)
  assert time.time() - t0 < 10
  msg = str(e.value)
  assert "tfds dataset 'cifar100' is not prepared under" in msg and "www.cs.toronto.edu:443" in msg
  assert f"`tfds build cifar100 --data_dir={tmp_path} --file_format=array_record`" in msg
  assert f"--config.data.data_dir={tmp_path}" in msg and "\n" not in msg
  assert calls == [False]  # only the look for prepared data; no download


def test_tfds_hosts_read_only_their_share_of_the_labels(monkeypatch):
  """With several hosts, each reads the labels of its contiguous share of the records only and
  the shares are exchanged: every host gets the one-host labels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  assert [list(sources.host_share(10, p, 3)) for p in range(3)] == [[0, 1, 2], [3, 4, 5],
                                                                   [6, 7, 8, 9]]
  assert list(sources.host_share(10)) == list(range(10))
  reads = []
  real_source = tfds.data_source

  class Counting:
    def __init__(self, src):
      self.src = src

    def __len__(self):
      return len(self.src)

    def __getitem__(self, i):
      reads.append(i)
      return self.src[i]

  with tfds.testing.mock_data(num_examples=10):
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: Counting(real_source(*a, **k)))
    one = sources.tfds_images("cifar10", "train", skip_decoding=False)
    assert sorted(reads) == list(range(10))
    shares = [one.labels[list(sources.host_share(10, p, 2))].tolist() for p in range(2)]
    for p in range(2):
      del reads[:]

      def allgather(mine, p=p):  # the hosts' exchange, simulated
        assert mine == shares[p]
        return shares
      host = sources.tfds_images("cifar10", "train", skip_decoding=False, process_index=p,
                                 process_count=2, allgather=allgather)
      assert sorted(reads) == list(sources.host_share(10, p, 2))
      np.testing.assert_array_equal(host.labels, one.labels)
      assert host.listed_by == 2
      np.testing.assert_array_equal(host.image(7), one.image(7))


# -- the offline archives in ../shared/data ------------------------------------------------------
@pytest.mark.parametrize("folder,name,per_class_train", [("imagenette", "imagenette_zip", 300),
                                                         ("cifar10", "cifar10_zip", 1000)])
def test_offline_archives_counts(shared_data, folder, name, per_class_train):
  manifest = json.loads((shared_data / "MANIFEST.json").read_text())
  ds = benchmarks.get(name)
  c = _config(name, "zip", 10, str(shared_data / folder), size=32, init=2, inc=2)
  c.data.max_per_class_train, c.data.max_per_class_test = 5, 3
  s = data_lib.build_stream(c)
  for split_set, f in zip((s.train_set, s.test_set), ds.zip_files):
    assert len(split_set) == manifest[f"{folder}/{f}"]["images"]
  assert np.bincount(s.train_set.labels).tolist() == [per_class_train] * 10
  assert s.counts == {"train": [10] * 5, "test": [6] * 5}
  assert len(s.train_set.class_names) == 10
  img = s.test_set.image(0)
  assert img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8
  if folder == "imagenette":
    assert min(img.shape[:2]) == 224  # short side 224 px (../shared/data/README.md)
  else:
    assert img.shape == (32, 32, 3)
  b = next(iter(s.train_batches(0, 0, 4)))
  assert b["image"].shape == (4, 32, 32, 3)


# -- the official transforms against torchvision -----------------------------------------------
def _torchvision():
  return pytest.importorskip("torchvision")


@pytest.mark.parametrize("size", [224, 56, 16])
@pytest.mark.parametrize("hw", [(150, 200), (32, 32), (300, 120)])
def test_test_transform_equals_torchvision(size, hw):
  tv = _torchvision()
  t = tv.transforms
  img = (np.random.RandomState(0).rand(*hw, 3) * 255).astype(np.uint8)
  ref = t.Compose([t.Resize(round(size * 256 / 224), interpolation=t.InterpolationMode.BICUBIC),
                   t.CenterCrop(size)])(Image.fromarray(img))
  np.testing.assert_array_equal(transforms.test_transform(img, size) * 255,
                                np.asarray(ref, np.float32))


@pytest.mark.parametrize("index", range(6))
def test_train_transform_equals_torchvision_given_the_box(index):
  tv = _torchvision()
  f, mode = tv.transforms.functional, tv.transforms.InterpolationMode
  img = (np.random.RandomState(index).rand(90, 120, 3) * 255).astype(np.uint8)
  rng = transforms.example_rng(7, 1, index)
  top, left, h, w = transforms.random_resized_crop_box(120, 90, rng)
  flip = rng.uniform() < 0.5
  ref = f.resized_crop(Image.fromarray(img), top, left, h, w, [32, 32], mode.BILINEAR)
  ref = f.hflip(ref) if flip else ref
  ours = transforms.train_transform(img, 32, transforms.example_rng(7, 1, index))
  np.testing.assert_allclose(ours * 255, np.asarray(ref, np.float32), atol=1e-3)


def test_crop_box_distribution_matches_torchvision():
  """Our numpy sampler draws boxes from the same law as RandomResizedCrop.get_params."""
  tv = _torchvision()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  img = torch.zeros(3, 90, 120)
  n = 3000
  theirs = np.array([tv.transforms.RandomResizedCrop.get_params(img, [0.05, 1.0], [3 / 4, 4 / 3])
                     for _ in range(n)], np.float64)
  rng = np.random.default_rng(0)
  ours = np.array([transforms.random_resized_crop_box(120, 90, rng) for _ in range(n)],
                  np.float64)
  assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= 90).all()
  assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= 120).all()

  def ks(a, b):  # two-sample Kolmogorov-Smirnov statistic
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a) -
                  np.searchsorted(np.sort(b), grid, "right") / len(b)).max()
  for stat in (lambda x: x[:, 2] * x[:, 3] / (90 * 120), lambda x: x[:, 3] / x[:, 2],
               lambda x: x[:, 0], lambda x: x[:, 1]):
    assert ks(stat(ours), stat(theirs)) < 0.05  # 1% critical value for n=3000 is ~0.042


def test_decoded_image_cache_is_bounded_and_transparent(tmp_path, monkeypatch):
  _write_folder(tmp_path / "Kvasir", [f"c{k}" for k in range(8)], 2, 1)
  root = str(tmp_path / "Kvasir" / "train")
  cached = sources.folder_images(root)
  monkeypatch.setenv("NTKCL_DATA_CACHE_MB", "0")
  uncached = sources.folder_images(root)
  for i in range(len(cached)):
    np.testing.assert_array_equal(cached.image(i), uncached.image(i))
  assert len(cached._cache) == 16 and not uncached._cache  # pylint: disable=protected-access
  # one 10x14 RGB image fits in a budget of 500 bytes, a second does not
  small = sources.ImageSet(cached.labels, cached.image, cache_bytes=500)
  small.image(0)
  small.image(1)
  assert list(small._cache) == [0]  # pylint: disable=protected-access


def test_tfds_source_decodes_undecoded_records(monkeypatch):
  """Real tfds sources are opened with SkipDecoding: the loader decodes the bytes itself."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  pngs = [_png(rng, 6 + k, 9) for k in range(4)]
  seen = {}

  def fake_source(name, *, split, data_dir, download, decoders):
    seen.update(name=name, split=split, decoders=decoders)
    return [{"image": b, "label": np.int64(k % 2)} for k, b in enumerate(pngs)] + [
        {"image": b"garbage", "label": np.int64(0)}]
  monkeypatch.setattr(tfds, "data_source", fake_source)
  s = sources.tfds_images("cifar100", "train[:10%]", "/data")
  assert isinstance(seen["decoders"]["image"], tfds.decode.SkipDecoding)
  assert s.labels.tolist() == [0, 1, 0, 1, 0]
  for k, b in enumerate(pngs):
    np.testing.assert_array_equal(s.image(k), np.asarray(Image.open(io.BytesIO(b))))
  with pytest.raises(data_lib.DataError, match="cifar100 train.*example 4"):
    s.image(4)


NINE = ["cifar100", "imagenet_r", "imagenet_a", "domainnet", "oxford_pets", "eurosat",
        "plantvillage", "vtab", "kvasir"]


@pytest.mark.parametrize("name", NINE)
def test_every_benchmark_streams_from_its_official_folder_layout(tmp_path, name):
  ds = benchmarks.get(name)
  classes = [f"class_{k:03d}" for k in range(ds.num_classes)]
  _write_folder(tmp_path / ds.folder, classes, per_train=2, per_test=1)
  init = max(1, ds.num_classes // 10)
  c = _config(name, "folder", ds.num_classes, str(tmp_path), size=8, init=init, inc=init)
  s = data_lib.build_stream(c)
  assert sum(s.counts["train"]) == 2 * ds.num_classes
  assert sum(s.counts["test"]) == ds.num_classes
  assert s.counts == summary.split_summary(c)["counts"]
  b = next(iter(s.train_batches(s.num_tasks - 1, 0, 2)))
  assert set(b["label"].tolist()) <= set(s.tasks[-1])
  # ImageFolder ids: original id k is the k-th folder alphabetically, so the label of every
  # image equals the class number written in its folder name.
  assert all(int(n.split("/")[0][6:]) == l for n, l in zip(s.train_set.names, s.train_set.labels))


def test_example_rng_depends_on_seed_epoch_and_index_only():
  def box(seed, epoch, index):
    return transforms.random_resized_crop_box(120, 90, transforms.example_rng(seed, epoch, index))
  assert box(0, 1, 5) == box(0, 1, 5)  # a pure function of the triple
  assert len({box(0, 0, i) for i in range(20)}) == 20  # every example its own crop
  assert len({box(s, 0, 3) for s in range(20)}) == 20
  assert len({box(0, e, 3) for e in range(20)}) == 20


# -- the demo images shipped in the package, and how the demo picks its source -----------------
BUNDLED = os.path.join(REPO, "ntkcl_jax", "data", "demo_images")


def _demo(arg, monkeypatch, shared):
  """configs/demo.py as the launcher loads it, with the archives looked for in `shared`."""
  from ntkcl_jax.configs import dinov2s_real  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(dinov2s_real, "SHARED_DATA", str(shared))
  return config_files.load_config_file("configs/demo.py" + (f":{arg}" if arg
                                                                            else ""))


def test_bundled_demo_set_is_what_its_manifest_says():
  manifest = json.loads(open(os.path.join(BUNDLED, "MANIFEST.json")).read())
  total = 0
  for key, per_class, short in (("imagenette/train.zip", 30, 112), ("imagenette/val.zip", 50, 64)):
    path = os.path.join(BUNDLED, key)
    blob = open(path, "rb").read()
    total += len(blob)
    assert hashlib.sha256(blob).hexdigest() == manifest[key]["sha256"]
    s = sources.zip_images(path)
    assert len(s) == manifest[key]["images"] == 10 * per_class
    assert np.bincount(s.labels).tolist() == [per_class] * 10
    assert len(s.class_names) == 10 and all(c.startswith("n0") for c in s.class_names)
    for i in (0, len(s) - 1):
      assert min(s.image(i).shape[:2]) == short and s.image(i).shape[2] == 3
  assert total < 5 * 2 ** 20  # small enough to ship inside the package


def test_demo_without_archives_uses_the_bundled_set(tmp_path, monkeypatch):
  c = _demo("", monkeypatch, tmp_path)  # no imagenette/ under tmp_path
  assert (c.data.name, c.data.source) == ("imagenette_demo", "zip")
  assert c.data.data_dir == os.path.join(BUNDLED, "imagenette")
  s = data_lib.build_stream(c)
  assert "source=bundled" in s.description and "sha256 verified" in s.description
  # 5 tasks x 2 classes, 30 training / 50 test images per class: the demo's protocol
  assert s.counts == {"train": [60] * 5, "test": [100] * 5}
  assert s.counts == summary.split_summary(c)["counts"]
  assert s.class_order.tolist() == np.random.RandomState(0).permutation(10).tolist()
  b = next(iter(s.train_batches(0, 0, 4)))
  assert b["image"].shape == (4, 56, 56, 3) and np.isfinite(b["image"]).all()


def test_forced_sources_and_their_errors(tmp_path, monkeypatch):
  # a config file's own errors come back as one line naming the file (config_files)
  with pytest.raises(cli.InputError, match=r"raised FileNotFoundError: source=zip: no "
                                           r"imagenette/ archives in"):
    _demo("source=zip", monkeypatch, tmp_path)
  c = _demo("source=bundled", monkeypatch, tmp_path)
  assert c.data.name == "imagenette_demo"
  c = _demo("source=tfds", monkeypatch, tmp_path)
  assert (c.data.name, c.data.source) == ("imagenette/160px", "tfds")
  with pytest.raises(cli.InputError, match="raised ValueError: source='nope'"):
    _demo("source=nope", monkeypatch, tmp_path)
  from ntkcl_jax.configs import dinov2s_real  # pylint: disable=g-import-not-at-top
  # more images or pixels than the bundled set holds: auto goes to tfds, a forced bundled errs
  assert dinov2s_real.pick_source("imagenette", "auto", 56, 31, 50) == "tfds"
  assert dinov2s_real.pick_source("imagenette", "auto", 112, 30, 50) == "tfds"
  assert dinov2s_real.pick_source("imagenette", "auto", 56, 20, 50) == "bundled"
  with pytest.raises(ValueError, match="holds 30 train / 50 test images per class"):
    dinov2s_real.pick_source("imagenette", "bundled", 56, 0, 50)
  with pytest.raises(ValueError, match="no demo set of cifar10"):
    dinov2s_real.pick_source("cifar10", "bundled", 56, 30, 50)
  monkeypatch.setattr(dinov2s_real, "BUNDLED_DATA", str(tmp_path / "gone"))
  with pytest.raises(FileNotFoundError, match="make_demo_set"):
    dinov2s_real.pick_source("imagenette", "bundled", 56, 30, 50)


def test_bundled_set_holds_the_images_the_archive_demo_draws(shared_data, monkeypatch):
  full = data_lib.build_stream(_demo("", monkeypatch, shared_data))
  assert full.config.data.name == "imagenette_zip" and "source=zip" in full.description
  small = data_lib.build_stream(_demo("source=bundled", monkeypatch, shared_data))
  assert small.class_order.tolist() == full.class_order.tolist()
  assert small.counts == full.counts
  for split, idx, sidx in (("train", full.train_idx, small.train_idx),
                           ("test", full.test_idx, small.test_idx)):
    fs, ss = getattr(full, f"{split}_set"), getattr(small, f"{split}_set")
    assert ss.class_names == fs.class_names
    assert [ss.names[i] for i in sidx] == [fs.names[i] for i in idx]  # same files, same order
    assert (ss.labels[sidx] == fs.labels[idx]).all()
  # After the test transform a bundled test image is the archive's up to JPEG re-encoding.
  for k in (0, 123, 499):
    a = full._eval_image("test", full.test_idx[k]) / 255.0  # pylint: disable=protected-access
    b = small._eval_image("test", small.test_idx[k]) / 255.0  # pylint: disable=protected-access
    assert np.abs(a - b).mean() < 0.02, k  # JPEG q90 noise; unrelated images differ by ~0.2
    other = full._eval_image("test", full.test_idx[(k + 250) % 500]) / 255.0  # pylint: disable=protected-access
    assert np.abs(other - b).mean() > 0.05


def test_demo_set_build_is_deterministic_and_matches_the_shipped_files(shared_data):
  from ntkcl_jax.tools import make_demo_set  # pylint: disable=g-import-not-at-top
  first, second = make_demo_set.build(str(shared_data)), make_demo_set.build(str(shared_data))
  assert first == second
  for rel, blob in first.items():
    with open(os.path.join(BUNDLED, rel), "rb") as f:
      assert f.read() == blob, rel


def test_tfds_builders_import_what_they_need(tmp_path):
  """Building/downloading a tfds dataset goes through DatasetBuilder.code_path, which imports
  importlib_resources (a tfds dependency tfds does not declare); no network is touched."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = tfds.builder("imagenette/160px", data_dir=str(tmp_path))
  assert os.path.exists(str(type(b).code_path))
  assert any(u.endswith("imagenette-160.tgz") for u in b.url_infos)
  from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top,unused-import
