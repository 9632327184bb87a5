"""The launcher on any mesh and in the open: eval batches of any size on 1, 3, 4 and 6 devices
give one accuracy matrix (and the command line that stopped on it exits cleanly); the pace in
metrics.jsonl and the whole-run progress line; the persistent compilation cache (on, and off
with ''); the profiler trace of chosen steps; the workdir lock on local folders and object
stores; new `train` keys leave old runs the same run."""
import glob
import gzip
import json
import math
import os
import re
import subprocess
import sys
import time

from etils import epath
import pytest

from ntkcl_jax import checkpoints, cli, paths, same_run, train
from test_pod_io import memory_gs  # pylint: disable=unused-import  # a fixture
from test_train import tiny_config
import _xla  # tests/_xla.py

pytestmark = pytest.mark.filterwarnings("ignore")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny.py with a train batch every mesh here divides (1, 3, 4, 6 devices), one epoch of each of
# the first two tasks
SMALL = {"optim.batch_size": 12, "optim.epochs": 1, "train.checkpoint_every_steps": 0,
         "data.tasks_to_run": 2}


def _launch(workdir, *extra, devices=1, env=None, progress=False):
  """The launcher on configs/tiny.py in a subprocess with `devices` fake CPU devices."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu",
             XLA_FLAGS=_xla.flags(devices))
  return subprocess.run([sys.executable, "-m", "ntkcl_jax.train", "--config=configs/tiny.py",
                         f"--workdir={workdir}", *([] if progress else ["--noprogress"]), *extra],
                        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.slow
def test_any_eval_batch_size_on_any_mesh_gives_the_one_device_matrix(tmp_path):
  """Eval batches of 18 and 64 images on meshes of 3, 4 and 6 devices (neither divides every
  mesh) are padded and masked: the accuracy matrix and the oracle-prototype row equal 1 device's
  (simplecil: the prototype and evaluation passes alone, no train step to compile per mesh).
  NTK-CL on the command line that used to stop on a sharding error (4 devices, eval batch 18)
  finishes without a traceback and equals 1 device; there the compilation cache is off ('') and
  writes nothing, not even to the folder JAX was given by its environment."""
  got = {}
  for ebsz in (18, 64):
    for n in (1, 3, 4, 6):
      res = train.run(tiny_config(**{**SMALL, "method.name": "simplecil", "data.tasks_to_run": 0,
                                     "train.mesh_data": n, "optim.eval_batch_size": ebsz}),
                      str(tmp_path / f"d{n}-e{ebsz}"), progress=False)
      got[n, ebsz] = (res["accuracy_matrix"], res["oracle_prototypes"]["per_task"])
      assert len(res["accuracy_matrix"]) == 3
  for (n, ebsz), value in got.items():
    assert value == got[1, ebsz], (n, ebsz)

  one = train.run(tiny_config(**SMALL, **{"train.mesh_data": 1, "optim.eval_batch_size": 18}),
                  str(tmp_path / "ntkcl1"), progress=False)
  given = tmp_path / "jax_env_cache"
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_COMPILATION_CACHE_DIR=str(given))
  p = _launch(tmp_path / "ntkcl4", *[f"--config.{k}={v}" for k, v in SMALL.items()],
              "--config.optim.eval_batch_size=18", "--config.train.compilation_cache_dir=",
              devices=4, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  with open(tmp_path / "ntkcl4" / "results.json") as f:
    four = json.load(f)
  assert four["accuracy_matrix"] == one["accuracy_matrix"] and len(one["accuracy_matrix"]) == 2
  assert four["oracle_prototypes"]["per_task"] == one["oracle_prototypes"]["per_task"]
  assert "compilation cache off" in p.stdout
  assert not given.exists() or not os.listdir(given)


@pytest.mark.slow
def test_pace_progress_line_compilation_cache_and_profile(tmp_path):
  """One tiny run watched: step lines carry lr, images_per_s and steps_per_s (positive,
  finite), stdout has the whole-run progress line with an ETA, the compilation cache folder
  gets entries, and steps 2-3 leave a trace TensorBoard and Perfetto open."""
  cache, wd = tmp_path / "cache", tmp_path / "run"
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  p = _launch(wd, f"--config.train.compilation_cache_dir={cache}",
              "--config.train.profile_steps=2,3", env=env, progress=True)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  steps = [l for l in map(json.loads, open(wd / "metrics.jsonl")) if l["event"] == "step"]
  assert len(steps) == 18
  for line in steps:
    for k in ("lr", "images_per_s", "steps_per_s"):
      assert line[k] > 0 and math.isfinite(line[k]), (k, line)
  assert {l["lr"] for l in steps} == {0.05, 0.025}  # tiny: lr 0.05, 2 epochs of cosine
  lines = re.findall(r"progress: (\d)/3 tasks done, step (\d+)/18, elapsed \d+:\d\d:\d\d, "
                     r"ETA (\d+:\d\d:\d\d), ([\d.]+) images/s", p.stdout)
  assert [(int(t), int(s)) for t, s, _, _ in lines][-3:] == [(1, 6), (2, 12), (3, 18)]
  assert lines[-1][2] == "0:00:00" and float(lines[-1][3]) > 0
  assert f"compilation cache {cache}" in p.stdout
  assert any(n.endswith("-cache") for n in os.listdir(cache))
  assert glob.glob(str(wd / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  traces = glob.glob(str(wd / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))
  assert traces
  with gzip.open(traces[0]) as f:
    names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
  # XLA's executions are there; the Python function tracer (spans named "$file:line fn") is off
  assert any("train_step" in n or "jit" in n.lower() for n in names), sorted(names)[:50]
  assert not [n for n in names if n.startswith("$")]
  assert "profile of train steps 2-3" in p.stdout


def test_compilation_cache_folder_rule(monkeypatch):
  monkeypatch.setenv("NTKCL_CACHE", "/c")
  rule = train.compilation_cache_folder
  assert rule("auto", "tpu", None) == rule("auto", "gpu", None) == "/c/jax_compilation"
  assert rule("auto", "cpu", None) is None  # XLA:CPU logs a false error per cached program
  assert rule("auto", "cpu", "/given") == rule("auto", "tpu", "/given") == "/given"
  assert rule("/mine", "cpu", "/given") == "/mine" and rule("", "tpu", "/given") is None
  assert checkpoints.cache_dir() == "/c"


def test_profile_steps_and_reader_threads_are_checked():
  with pytest.raises(cli.InputError, match=r"profile_steps=\(3, 2\).*1 <= first <= last"):
    train.validate_config(tiny_config(**{"train.profile_steps": (3, 2)}))
  with pytest.raises(cli.InputError, match="profile_steps"):
    train.validate_config(tiny_config(**{"train.profile_steps": (4,)}))
  with pytest.raises(cli.InputError, match="reader_threads=-1"):
    train.validate_config(tiny_config(**{"train.reader_threads": -1}))
  train.validate_config(tiny_config(**{"train.profile_steps": (2, 2)}))


def test_new_train_keys_keep_old_runs_the_same_run():
  """A run saved before train.compilation_cache_dir, profile_steps and reader_threads existed
  is the same run, whatever they are set to now (train.* is bookkeeping)."""
  config = tiny_config(**{"train.reader_threads": 7, "train.profile_steps": (1, 2),
                          "train.compilation_cache_dir": ""})
  saved = same_run.config_json(tiny_config())
  for k in ("compilation_cache_dir", "profile_steps", "reader_threads"):
    del saved["train"][k]
  assert same_run.differences(saved, config) == []


def test_pace_rates_and_progress_line():
  now = [0.0]
  pace = train.Pace(total_steps=10, num_tasks=2, log_every=2, clock=lambda: now[0])
  now[0] = 5.0  # step 1: compiling
  pace.step(8)
  assert pace.rates() == {"images_per_s": 8 / 5, "steps_per_s": 1 / 5}
  assert pace.line(0, 1) is None  # the first log point: not yet log_every of them
  for _ in range(4):  # steps 2-5, one second each, 6 real images in the last
    now[0] += 1.0
    pace.step(8 if _ < 3 else 6)
  assert pace.rates() == {"images_per_s": 30 / 4, "steps_per_s": 1.0}
  assert pace.line(0, 5) is None  # two log points, but not 30 s
  now[0] = 40.0
  assert pace.line(1, 5, task_end=True) == (
      "progress: 1/2 tasks done, step 5/10, elapsed 0:00:40, ETA 0:00:43, 0.9 images/s")
  now[0] += 1.0
  assert pace.line(1, 6) is None  # the last line was 1 s ago
  assert train.hms(3725.9) == "1:02:05"


def test_workdir_lock_on_an_object_store(memory_gs):  # pylint: disable=redefined-outer-name
  """gs:// has no locks: the lock file names its holder, refuses others while it is renewed,
  is taken over when stale (a crashed launcher's) and is deleted on release."""
  del memory_gs
  lock_file = epath.Path("gs://bucket/run/.lock")
  first = paths.WorkdirLock("gs://bucket/run")
  first.acquire()
  held = json.loads(lock_file.read_text())
  assert held["pid"] == os.getpid() and held["time"] == pytest.approx(time.time(), abs=60)
  with pytest.raises(cli.InputError, match=rf"in use by another launcher \(pid {os.getpid()} on "
                     r"host .*renewed \d+ s ago"):
    paths.WorkdirLock("gs://bucket/run/").acquire()
  first.release()
  assert not lock_file.exists()
  lock_file.write_text(json.dumps({"host": "gone", "pid": 1, "time": time.time() - 1000}))
  with paths.WorkdirLock("gs://bucket/run", stale_s=300):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert not lock_file.exists()


def test_workdir_lock_on_a_local_folder(tmp_path):
  """flock: a second holder is refused naming the first; release removes the file, and a lock
  file left by a killed launcher (no lock held on it) is taken."""
  with paths.WorkdirLock(tmp_path):
    with pytest.raises(cli.InputError, match=f"pid {os.getpid()} on host"):
      paths.WorkdirLock(tmp_path).acquire()
  assert not (tmp_path / ".lock").exists()
  (tmp_path / ".lock").write_text(json.dumps({"host": "h", "pid": 1}))  # as a SIGKILL leaves it
  with paths.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
