"""Task-stream contract (docs/design.md, Task stream): re-sharding, resume, host coverage, masks."""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ntkcl_jax import data as data_lib
from ntkcl_jax import normalization
from ntkcl_jax import config_files
from ntkcl_jax.data import protocol, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(transform="official", per_train=9, per_test=5, classes=6, size=12, seed=0,
            normalize="inception"):
  c = config_files.load_config_file("configs/tiny.py")
  c.seed = seed
  c.model.image_size = size
  c.model.normalize = normalize
  c.data.num_classes = classes
  c.data.init_cls = 2
  c.data.increment = 3  # 6 classes -> tasks of 2, 3, 1 (remainder)
  c.data.max_per_class_train = per_train
  c.data.max_per_class_test = per_test
  c.data.train_transform = transform
  return c


def _stream(process_index=0, process_count=1, **kw):
  return data_lib.build_stream(_config(**kw), process_index, process_count)


def _epoch(stream, task, epoch, batch_size, start=0):
  return list(stream.train_batches(task, epoch, batch_size, start_batch=start))


def _concat_masked(batches):
  """Real (unmasked) rows of a list of batches, in order."""
  return {k: np.concatenate([b[k][b["mask"]] for b in batches]) for k in ("image", "label")}


def _key(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_contract_shapes_and_metadata():
  s = _stream()
  assert s.num_classes == 6 and s.num_tasks == 3
  assert [len(t) for t in s.tasks] == [2, 3, 1]
  np.testing.assert_array_equal(s.class_order, np.random.RandomState(0).permutation(6))
  assert "synthetic" in s.description
  assert s.counts == {"train": [18, 27, 9], "test": [10, 15, 5]}
  assert s.num_train_batches(1, 4) == 7  # ceil(27 / 4), last partial batch kept
  b = next(iter(s.train_batches(1, 0, 4)))
  assert b["image"].shape == (4, 12, 12, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
  assert set(b["label"].tolist()) <= set(s.tasks[1])


def test_labels_are_remapped_originals():
  s = _stream(transform="none")
  order = s.epoch_order(1, 0)
  got = _concat_masked(_epoch(s, 1, 0, 5))["label"]
  want = protocol.remap(s.train_set.labels[order], s.class_order)
  np.testing.assert_array_equal(got, want)


def test_images_follow_epoch_order_and_normalisation():
  # train_transform='none': each row is the resized source image of order[j], uint8; the
  # model's input is that image / 255, normalised.
  s = _stream(transform="none")
  order = s.epoch_order(0, 2)
  got = _concat_masked(_epoch(s, 0, 2, 4))["image"]
  want = np.stack([transforms.resize_only_uint8(s.train_set.image(i), 12) for i in order])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(s.model_input(got),
                             normalization.normalize(want / np.float32(255), "inception"),
                             atol=1e-6)


def _old_float_train_transform(image, size, rng):
  """The float path the stream had before it sent uint8: PIL crop + resize, float32 / 255, flip."""
  img = transforms.to_pil(image)
  top, left, h, w = transforms.random_resized_crop_box(img.width, img.height, rng)
  img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  out = np.asarray(img, np.float32) / 255.0
  return np.ascontiguousarray(out[:, ::-1] if rng.uniform() < 0.5 else out)


@pytest.mark.parametrize("normalize", ["none", "inception", "imagenet"])
@pytest.mark.parametrize("transform", ["official", "none"])
def test_uint8_images_normalised_on_device_equal_the_host_float_path(normalize, transform):
  """The stream's uint8 batch through `model_input` inside jit (as the learner's step does)
  equals, bit for bit, the float32 images the host used to normalise itself."""
  s = _stream(transform=transform, normalize=normalize)
  epoch = 1
  order = s.epoch_order(0, epoch)
  got = _concat_masked(_epoch(s, 0, epoch, 4))["image"]
  if transform == "official":
    floats = [_old_float_train_transform(s.train_set.image(i), 12,
                                         transforms.example_rng(s.seed, epoch, int(i)))
              for i in order]
  else:
    floats = [transforms.resize_only(s.train_set.image(i), 12) for i in order]
  want = np.asarray(normalization.normalize(np.stack(floats), normalize), np.float32)
  on_device = jax.jit(s.model_input)(got)
  assert on_device.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(on_device), want)
  np.testing.assert_array_equal(s.model_input(got), want)  # numpy (host) path too
  proto = _concat_masked(list(s.eval_batches("proto", s.tasks[0], 4)))["image"]
  idx = s.train_idx[np.isin(s.train_new[s.train_idx], s.tasks[0])]
  test_transform = (transforms.test_transform if transform == "official" else
                    transforms.resize_only)
  want = normalization.normalize(np.stack([test_transform(s.train_set.image(i), 12)
                                           for i in idx]), normalize)
  np.testing.assert_array_equal(np.asarray(jax.jit(s.model_input)(proto)), want)


def test_shuffle_depends_only_on_seed_task_epoch():
  a, b = _stream(), _stream(process_count=2, process_index=1)
  np.testing.assert_array_equal(a.epoch_order(1, 3), b.epoch_order(1, 3))
  assert not np.array_equal(a.epoch_order(1, 3), a.epoch_order(1, 4))
  assert not np.array_equal(a.epoch_order(1, 3), _stream(seed=1).epoch_order(1, 3))
  # Each epoch is a permutation of the task's images.
  assert sorted(a.epoch_order(1, 3)) == sorted(a.epoch_order(1, 4))


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_augmentation_independent_of_batch_size_and_hosts(batch_size):
  """Per-example random crops/flips depend on (seed, epoch, index) only (official transform)."""
  ref = _concat_masked(_epoch(_stream(), 1, 1, 3))  # 1 host, batch 3
  for hosts in (1, 2, 4) if batch_size % 4 == 0 else (1, 2):
    parts = [_epoch(_stream(p, hosts), 1, 1, batch_size) for p in range(hosts)]
    # Host p holds rows [p*per, (p+1)*per) of each global batch: stitch them back.
    glob = [{k: np.concatenate([parts[p][b][k] for p in range(hosts)]) for k in parts[0][b]}
            for b in range(len(parts[0]))]
    assert all(x["image"].shape[0] == batch_size for x in glob)
    got = _concat_masked(glob)
    np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_allclose(got["image"], ref["image"], atol=0)


def test_official_augmentation_differs_between_epochs():
  s = _stream()
  e0 = _concat_masked(_epoch(s, 0, 0, 6))
  e0b = _concat_masked(_epoch(s, 0, 0, 6))
  np.testing.assert_array_equal(e0["image"], e0b["image"])
  order0, order1 = s.epoch_order(0, 0), s.epoch_order(0, 1)
  e1 = _concat_masked(_epoch(s, 0, 1, 6))
  pos1 = {int(i): j for j, i in enumerate(order1)}
  same_example_e1 = e1["image"][[pos1[int(i)] for i in order0]]
  assert not np.allclose(same_example_e1, e0["image"])  # fresh crops each epoch


def test_two_hosts_see_every_example_once_per_epoch():
  s = _stream(transform="none")
  task = 1
  idx = s._task_train_indices(task)  # pylint: disable=protected-access
  img_key = {_key(transforms.resize_only_uint8(s.train_set.image(i), 12)): int(i) for i in idx}
  assert len(img_key) == len(idx)  # synthetic images are distinct
  seen = []
  for p in range(2):
    for b in _epoch(_stream(p, 2, transform="none"), task, 0, 4):
      seen += [img_key[_key(x)] for x in b["image"][b["mask"]]]
  assert sorted(seen) == sorted(int(i) for i in idx)


def test_last_partial_batch_is_padded_with_real_examples_and_masked():
  s = _stream(transform="none")
  batches = _epoch(s, 1, 0, 8)  # 27 images: 3 full batches + 3 real rows
  assert len(batches) == s.num_train_batches(1, 8) == 4
  last = batches[-1]
  assert last["mask"].tolist() == [True] * 3 + [False] * 5
  real = {_key(x) for x in last["image"][:3]}
  assert all(_key(x) in real for x in last["image"][3:])
  assert sum(int(b["mask"].sum()) for b in batches) == 27


@pytest.mark.parametrize("stop_after", [0, 2, 5])
def test_resume_mid_epoch_yields_identical_remaining_batches(stop_after):
  full = _epoch(_stream(), 1, 2, 4)
  # (a) a fresh process restarted with start_batch (how the launcher resumes)
  resumed = _epoch(_stream(), 1, 2, 4, start=stop_after)
  # (b) grain-style: consume, save state, restore into a new iterator
  it = _stream().train_batches(1, 2, 4)
  for _ in range(stop_after):
    next(it)
  state = it.get_state()
  assert state == {"task": 1, "epoch": 2, "next_batch": stop_after}
  it2 = _stream().train_batches(1, 2, 4)
  next(it2)
  it2.set_state(state)
  restored = list(it2)
  for other in (resumed, restored):
    assert len(other) == len(full) - stop_after
    for x, y in zip(full[stop_after:], other):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_set_state_rejects_other_task():
  it = _stream().train_batches(0, 0, 4)
  with pytest.raises(ValueError, match="another"):
    it.set_state({"task": 1, "epoch": 0, "next_batch": 0})
  with pytest.raises(ValueError, match="start_batch"):
    _stream().train_batches(0, 0, 4, start_batch=99)


def test_eval_batches_test_and_proto():
  s = _stream()
  classes = s.tasks[0] + s.tasks[1]
  test = list(s.eval_batches("test", classes, 4))
  proto = list(s.eval_batches("proto", classes, 4))
  t, p = _concat_masked(test), _concat_masked(proto)
  assert len(t["label"]) == 25 and len(p["label"]) == 45  # 5 test / 9 train images per class
  assert set(t["label"].tolist()) == set(classes) and set(p["label"].tolist()) == set(classes)
  assert all(b["image"].shape[0] == 4 for b in test + proto)
  # proto = training images under the deterministic TEST transform, in index order
  idx = s.train_idx[np.isin(s.train_new[s.train_idx], classes)]
  want = np.stack([transforms.test_transform_uint8(s.train_set.image(i), 12) for i in idx])
  np.testing.assert_array_equal(p["image"], want)
  # no shuffling: a second pass is identical; two hosts stitch to the global batches
  again = _concat_masked(list(s.eval_batches("test", classes, 4)))
  np.testing.assert_array_equal(again["image"], t["image"])
  h = [list(_stream(q, 2).eval_batches("test", classes, 4)) for q in range(2)]
  stitched = [{k: np.concatenate([h[0][b][k], h[1][b][k]]) for k in h[0][b]}
              for b in range(len(h[0]))]
  np.testing.assert_array_equal(_concat_masked(stitched)["image"], t["image"])
  # a batch size the hosts do not divide: each host's rows are padded (masked), same images
  h = [list(_stream(q, 2).eval_batches("test", classes, 5)) for q in range(2)]
  assert all(b["image"].shape[0] == 3 for b in h[0] + h[1])
  stitched = [{k: np.concatenate([h[0][b][k], h[1][b][k]]) for k in h[0][b]}
              for b in range(len(h[0]))]
  assert len(stitched) == 5 and all(b["mask"].sum() == 5 for b in stitched)
  np.testing.assert_array_equal(_concat_masked(stitched)["image"], t["image"])


def test_reader_threads_follow_the_host_and_never_change_a_batch(monkeypatch):
  assert data_lib.stream.reader_threads(3) == 3
  monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(96)), raising=False)
  assert data_lib.stream.reader_threads(0) == data_lib.stream.MAX_READER_THREADS == 32
  monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2}, raising=False)
  assert data_lib.stream.reader_threads() == 3
  batches = {}
  for n in (1, 5):
    c = _config()
    c.train.reader_threads = n
    s = data_lib.build_stream(c)
    assert s.reader_threads == n
    batches[n] = _epoch(s, 1, 0, 4) + list(s.eval_batches("proto", s.tasks[1], 4))
  for a, b in zip(batches[1], batches[5]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_subsampling_is_fixed_and_capped():
  a, b = _stream(per_train=4, seed=0), _stream(per_train=4, seed=3)
  np.testing.assert_array_equal(a.train_idx, b.train_idx)  # the same images for every seed
  assert np.bincount(a.train_set.labels[a.train_idx]).tolist() == [4] * 6


# -- errors ------------------------------------------------------------------------------------
def test_error_unknown_dataset_lists_valid_names():
  c = _config()
  c.data.name = "cifar1000"
  with pytest.raises(ValueError, match="cifar100.*imagenet_r"):
    data_lib.build_stream(c)


def test_error_unknown_source_and_transform():
  c = _config()
  c.data.source = "s3"
  with pytest.raises(ValueError, match="one of"):
    data_lib.build_stream(c)
  c = _config()
  c.data.train_transform = "autoaugment"
  with pytest.raises(ValueError, match="'official' or 'none'"):
    data_lib.build_stream(c)


def test_error_class_count_not_the_benchmark():
  c = _config()
  c.data.name, c.data.source, c.data.num_classes = "digits", "digits", 12
  with pytest.raises(data_lib.DataError, match="num_classes=10"):
    data_lib.build_stream(c)


def test_error_batch_not_divisible_by_hosts():
  with pytest.raises(ValueError, match="not divisible by 2 processes"):
    next(iter(_stream(0, 2).train_batches(0, 0, 5)))


def test_error_empty_class_and_class_count_mismatch():
  from ntkcl_jax.data import sources, stream as stream_lib
  imgs = np.zeros((6, 4, 4, 3), np.uint8)
  train_set = sources.array_images(imgs, [0, 0, 1, 1, 3, 3], "t", ["a", "b", "c", "d"])
  test_set = sources.array_images(imgs, [0, 1, 2, 3, 3, 3], "t", ["a", "b", "c", "d"])
  c = _config(classes=4)
  with pytest.raises(data_lib.DataError, match=r"\['c'\] have no train images"):
    stream_lib.TaskStream(c, train_set, test_set)
  c = _config(classes=6)
  with pytest.raises(data_lib.DataError, match="has 4 classes but data.num_classes=6"):
    stream_lib.TaskStream(c, train_set, test_set)
