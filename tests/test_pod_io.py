"""Run directories and datasets off the local disk (docs/design.md, Workdir on any file system):
`gs://` paths served by an in-memory fsspec file system through etils.epath, `file://` URIs and
epath.Path workdirs, and each host listing only its share of an image folder.

What the in-memory `gs://` covers: prepare_workdir, metrics.jsonl, TensorBoard, results.json,
plots, folder listing and image reads, and a whole launcher run with resume. Not covered: orbax
writing to gs:// (its arrays go through tensorstore's own GCS driver, which an in-memory
file system cannot serve), so that run keeps its checkpoints on a local path; the real orbax
resume from a non-`os.path` workdir form is the `file://` + epath.Path run.
"""
import json
import os
import shutil
import struct

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2

from ntkcl_jax import cli, config_files, metric_writer, paths, plots, results, train
from ntkcl_jax.checkpoints import run_state
from ntkcl_jax.data import sources

pytestmark = pytest.mark.filterwarnings("ignore")


class _InMemory(MemoryFileSystem):
  """fsspec's in-memory file system, with a store of its own, standing in for GCS."""
  store: dict = {}
  pseudo_dirs = [""]


class _InMemoryBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  def __init__(self, fs):
    self._fs = fs

  def fs(self, path):
    return self._fs


@pytest.fixture
def memory_gs(monkeypatch):
  """`gs://...` epath paths served from memory (what gcsfs does over the network)."""
  fs = _InMemory(skip_instance_cache=True)
  fs.store.clear()
  fs.pseudo_dirs[:] = [""]
  backends = dict(gpath._PREFIX_TO_BACKEND, gs=_InMemoryBackend(fs))  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_PREFIX_TO_BACKEND", backends)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to tf.io.gfile
  return fs


def _events(data: bytes) -> list:
  """(tag, step, value) of the scalars in a TensorBoard event file (TFRecord framing)."""
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    out += [(v.tag, ev.step, round(v.simple_value, 5)) for v in ev.summary.value]
  return out


# -- paths ---------------------------------------------------------------------------------------
def test_path_forms(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.normalize("runs/a") == str(tmp_path / "runs" / "a")
  assert paths.normalize(f"file://{tmp_path}/b/") == str(tmp_path / "b")
  assert paths.normalize(epath.Path(tmp_path) / "c") == str(tmp_path / "c")
  assert paths.normalize("gs://bucket/run/") == "gs://bucket/run"
  assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  assert [paths.is_remote(p) for p in ("gs://b/x", "s3://b/x", "file:///x", "/x", "x")] == [
      True, True, False, False, False]


# -- writers on an in-memory gs:// ---------------------------------------------------------------
def test_workdir_writers_on_in_memory_gs(memory_gs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # anything written as a mangled local path would land here
  gs, local = "gs://bucket/run", str(tmp_path / "local")

  # prepare_workdir: creates and probes; no free-space question to an object store
  def no_disk_usage(_):
    raise AssertionError("disk_usage called on a remote path")
  with monkeypatch.context() as m:
    m.setattr(shutil, "disk_usage", no_disk_usage)
    train.prepare_workdir(gs, min_free_bytes=1 << 62)
  assert epath.Path(gs).is_dir() and not list(epath.Path(gs).iterdir())  # probe removed
  with pytest.raises(cli.InputError, match="MiB free under"):
    train.prepare_workdir(local, min_free_bytes=1 << 62)  # the local check is still made

  # metrics.jsonl: the same calls give the same file as the local (append + truncate) writer
  recs = [{"event": "step", "step": s, "loss": np.float32(1.0 / s)} for s in range(1, 6)]
  saw = {}
  for where in (gs, local):
    w = metric_writer.MetricWriter(where, active=True)
    w.truncate(0)
    for r in recs[:3]:
      w.write(r)
      w.scalars(r["step"], {"loss": r["loss"]}, "train")
    saw[where] = w.nbytes()  # what a checkpoint at step 3 records
    assert epath.Path(where, "metrics.jsonl").read_bytes().count(b"\n") == 3  # on storage now
    for r in recs[3:]:
      w.write(r)
    w.flush()
    w.close()
    # resumed from the step-3 checkpoint: the lines after it are cut, then logged again
    w = metric_writer.MetricWriter(where, active=True, resume_step=3)
    w.truncate(saw[where])
    for r in recs[3:]:
      w.write(r)
      w.scalars(r["step"], {"loss": r["loss"]}, "train")
    w.close()
  assert saw[gs] == saw[local]
  want = "".join(json.dumps(results.jsonable(r)) + "\n" for r in recs).encode()
  assert epath.Path(gs, "metrics.jsonl").read_bytes() == want
  assert epath.Path(local, "metrics.jsonl").read_bytes() == want

  # TensorBoard: the event files reach gs://.../tb whole, with the scalars written
  for where in (gs, local):
    files = sorted(epath.Path(where, "tb").iterdir())
    assert len(files) == 2 and all(f.name.startswith("events.out.tfevents") for f in files)
    got = sorted(e for f in files for e in _events(f.read_bytes()))
    assert got == sorted(("train/loss", r["step"], round(1.0 / r["step"], 5)) for r in recs)

  # an inactive (non-main) writer writes nothing
  w = metric_writer.MetricWriter("gs://bucket/other", active=False)
  w.write(recs[0])
  w.close()
  assert not epath.Path("gs://bucket/other").exists()

  # results.json and the plots
  results.atomic_write_json(paths.join(gs, "results.json"), {"a": [1.5, None]})
  assert json.loads(epath.Path(gs, "results.json").read_text()) == {"a": [1.5, None]}
  r = np.array([[50.0, np.nan], [40.0, 60.0]])
  plots.accuracy_matrix_heatmap(r, paths.join(gs, "m.png"))
  plots.accuracy_per_task(r, paths.join(gs, "t.png"), [50.0, 50.0])
  for name in ("m.png", "t.png"):
    assert epath.Path(gs, name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in epath.Path(gs).iterdir()) == [
      "m.png", "metrics.jsonl", "results.json", "t.png", "tb"]
  assert sorted(os.listdir(tmp_path)) == ["local"]  # no `gs:` folder appeared locally


# -- per-host folder listing ---------------------------------------------------------------------
def _write_folder(root, classes, per_class, seed=0):
  rng = np.random.RandomState(seed)
  for c in classes:
    for k in range(per_class):
      sub = os.path.join(root, c, "sub" if k % 2 else "")
      os.makedirs(sub, exist_ok=True)
      Image.fromarray((rng.rand(6, 5, 3) * 255).astype(np.uint8)).save(
          os.path.join(sub, f"{k:02d}.png"))
  os.makedirs(os.path.join(root, ".cache"), exist_ok=True)  # hidden: not a class
  open(os.path.join(root, ".cache", "x.png"), "wb").close()


def test_hosts_list_disjoint_shares_that_give_the_one_host_listing(tmp_path):
  root = str(tmp_path / "train")
  classes = ["b", "a", "e", "c", "d"]
  _write_folder(root, classes, per_class=3)
  # what one host lists, by a plain walk of every class folder
  full = sorted(os.path.relpath(os.path.join(d, f), root)
                for c in classes for d, _, fs in os.walk(os.path.join(root, c)) for f in fs)
  one = sources.folder_images(root)
  assert one.names == full and one.class_names == sorted(classes)
  for count in (2, 3):
    shares = [sources.list_folder_share(root, sources.folder_classes(root), p, count)
              for p in range(count)]
    union = [n for s in shares for n in s]
    assert len(union) == len(set(union)) and sorted(union) == full  # disjoint, complete
    assert all(len({n.split("/")[0] for n in s}) <= -(-len(classes) // count) for s in shares)
    for p in range(count):
      def allgather(mine, p=p, shares=shares):  # the hosts' exchange, simulated
        assert mine == shares[p]
        return shares
      host = sources.folder_images(root, p, count, allgather)
      assert host.names == one.names and host.listed_by == count
      np.testing.assert_array_equal(host.labels, one.labels)
      np.testing.assert_array_equal(host.image(7), one.image(7))


def test_folder_dataset_on_in_memory_gs(memory_gs, tmp_path):
  root = str(tmp_path / "train")
  _write_folder(root, ["x", "y", "z"], per_class=2)
  for d, _, fs in os.walk(root):
    for f in fs:
      rel = os.path.relpath(os.path.join(d, f), root)
      epath.Path("gs://bucket/data/train", rel).write_bytes(open(os.path.join(d, f), "rb").read())
  local, remote = sources.folder_images(root), sources.folder_images("gs://bucket/data/train")
  assert remote.names == local.names
  np.testing.assert_array_equal(remote.labels, local.labels)
  for i in range(len(local)):
    np.testing.assert_array_equal(remote.image(i), local.image(i))


# -- whole runs ----------------------------------------------------------------------------------
class _Stop(Exception):
  pass


def _tiny():
  config = config_files.load_config_file("configs/tiny.py")
  config.train.mesh_data = 1
  return config


def _interrupted_then_resumed(workdir, resume_as, stop_after_step, monkeypatch):
  """Runs tiny until the metrics line of step `stop_after_step` (an exception, as a crash),
  then reruns in `resume_as` (the same directory in another form); returns the second result."""
  write = metric_writer.MetricWriter.write

  def stopping(self, record):
    write(self, record)
    if record.get("event") == "step" and record["step"] == stop_after_step:
      raise _Stop
  with monkeypatch.context() as m:
    m.setattr(metric_writer.MetricWriter, "write", stopping)
    with pytest.raises(_Stop):
      train.run(_tiny(), workdir, progress=False)
  return train.run(_tiny(), resume_as, progress=False)


@pytest.mark.slow
def test_runs_on_file_uri_and_in_memory_gs_complete_and_resume(memory_gs, tmp_path, monkeypatch,
                                                                capsys):
  monkeypatch.chdir(tmp_path)
  save = run_state.RunCheckpointer.save

  def save_and_wait(self, *a):  # saves finish before an injected crash: no save left in flight
    save(self, *a)
    self.wait()
  monkeypatch.setattr(run_state.RunCheckpointer, "save", save_and_wait)

  # file:// URI, resumed as an epath.Path: real orbax checkpoints under tmp_path/a
  a = tmp_path / "a"
  res_a = _interrupted_then_resumed(f"file://{a}", epath.Path(a), 5, monkeypatch)
  assert f"resuming {a} at" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ["a"]  # not $PWD/file:/...

  # gs:// workdir in memory; orbax's directory mapped to a local folder (see module docstring)
  ckdirs = {}
  init = run_state.RunCheckpointer.__init__

  def local_checkpoints(self, directory, *args, **kw):
    assert str(directory) == "gs://bucket/run/checkpoints"
    ckdirs[str(directory)] = str(tmp_path / "gs_checkpoints")
    init(self, ckdirs[str(directory)], *args, **kw)
  monkeypatch.setattr(run_state.RunCheckpointer, "__init__", local_checkpoints)
  res_b = _interrupted_then_resumed("gs://bucket/run", "gs://bucket/run/", 10, monkeypatch)
  assert "resuming gs://bucket/run at" in capsys.readouterr().out

  # both resumed runs equal each other (and so the uninterrupted run, tests/test_train_resume.py)
  for r in (res_a, res_b):
    r.pop("wall_time_s")
  assert res_a == res_b
  on_gs = json.loads(epath.Path("gs://bucket/run/results.json").read_text())
  on_gs.pop("wall_time_s")
  assert on_gs == json.loads(json.dumps(res_b))
  assert (epath.Path("gs://bucket/run/metrics.jsonl").read_bytes()
          == (a / "metrics.jsonl").read_bytes())  # lines after each checkpoint cut, not doubled
  assert sorted(p.name for p in epath.Path("gs://bucket/run").iterdir()) == [
      "accuracy_matrix.png", "accuracy_per_task.png", "metrics.jsonl", "results.json", "tb"]
  assert len(list(epath.Path("gs://bucket/run/tb").iterdir())) == 2  # one event file per start
