"""Bad input and faults: each stops with a clear message and loses nothing already saved."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ntkcl_jax import checkpoints, cli, learner as learner_lib, sharding, train
from ntkcl_jax.checkpoints import run_state
from test_train import tiny_config
import _xla  # tests/_xla.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/tiny.py"


ENV = dict(os.environ, XLA_FLAGS=_xla.flags(1))

# The launcher with the network cut (every Python socket refuses to connect), so that a test of
# what happens before any download can never reach a download host, even if it fails.
OFFLINE = """
import socket, sys
def refuse(*a, **k):
  raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
from ntkcl_jax import train
train.main()
"""

# The launcher with a failure injected at the first task end, right after the asynchronous
# checkpoint save of the task's last step started (tiny: checkpoint_every_steps=2, 6 steps).
FAIL_AT_TASK_END = """
from ntkcl_jax import learner, train
def fail(self, *args, **kwargs):
  raise ValueError("injected failure at a task end")
learner.Learner.end_task = fail
train.main()
"""


def launch(workdir, *extra, prefix=("-m", "ntkcl_jax.train")):
  return subprocess.run([sys.executable, *prefix, f"--config={CONFIG}",
                         f"--workdir={workdir}", "--noprogress", *extra], capture_output=True,
                        text=True, timeout=300, cwd=REPO, env=ENV)


def test_impossible_split_cli_message_and_exit_code(tmp_path):
  p = launch(tmp_path, "--config.data.init_cls=7")
  assert p.returncode == 2
  assert "impossible split: init_cls=7 is more than the 6 classes" in p.stderr
  assert "Traceback" not in p.stderr


def test_unknown_key_cli_exit_code(tmp_path):
  p = launch(tmp_path, "--config.optim.batchsize=4")
  assert p.returncode == 2 and "did you mean optim.batch_size" in p.stderr
  assert "Traceback" not in p.stderr


def test_missing_backbone_checkpoint_names_the_path():
  config = tiny_config(**{"model.checkpoint": "/nonexistent/B_16.npz"})
  with pytest.raises(checkpoints.CheckpointNotFoundError,
                     match="backbone checkpoint not found: '/nonexistent/B_16"):
    checkpoints.build_backbone(config)


def test_missing_data_path_is_reported(tmp_path):
  config = tiny_config(**{"data.source": "folder", "data.data_dir": str(tmp_path / "no_data")})
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/no_data"):
    train.run(config, str(tmp_path / "wd"), progress=False)
  assert not (tmp_path / "wd" / "checkpoints").exists()  # stopped before anything was saved


def test_missing_checkpoint_is_one_line_before_any_data_is_read(tmp_path):
  """The benchmark command with a checkpoint that does not exist and an empty data folder names
  the checkpoint within seconds: nothing is listed, downloaded or prepared, no workdir made."""
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  t0 = time.time()
  p = subprocess.run(
      [sys.executable, "-c", OFFLINE, "--config=configs/ntkcl_benchmarks.py:benchmark=cifar100,"
       f"backbone=in21k,ckpt=/no/such/ckpt.npz,data_dir={data_dir}",
       f"--workdir={tmp_path / 'wd'}", "--noprogress"],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
  took = time.time() - t0
  assert p.returncode == 2, p.stderr[-2000:]
  assert "error: backbone checkpoint not found: '/no/such/ckpt.npz'" in p.stderr
  assert "Traceback" not in p.stderr and "tfds" not in p.stderr + p.stdout
  assert not os.listdir(data_dir) and not (tmp_path / "wd").exists()
  assert took < 60, took  # the interpreter and JAX start; nothing else


def test_error_with_a_save_in_flight_exits_cleanly(tmp_path):
  """An error while a checkpoint is being written ends with its one line, after the save is
  finished: no orbax traceback from a commit left to the interpreter's shutdown."""
  p = launch(tmp_path, prefix=("-c", FAIL_AT_TASK_END))
  assert p.returncode == 2, p.stderr[-2000:]
  assert "error: injected failure at a task end" in p.stderr
  assert "Traceback" not in p.stderr and "cannot schedule new futures" not in p.stderr
  ck = run_state.RunCheckpointer(str(tmp_path / "checkpoints"))
  assert ck.all_ids() == [4, 6]  # the save in flight at the error was completed
  ck.close()


@pytest.mark.slow
def test_one_launcher_per_workdir_and_a_killed_one_leaves_no_lock(tmp_path):
  """A second launcher on a workdir in use stops with one line naming the first (host, pid);
  after the first is SIGKILLed the next launcher runs."""
  short = ("--config.optim.epochs=1", "--config.data.tasks_to_run=1")
  first = subprocess.Popen([sys.executable, "-m", "ntkcl_jax.train", f"--config={CONFIG}",
                            f"--workdir={tmp_path}", "--noprogress", *short], cwd=REPO, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
      try:
        if json.loads((tmp_path / ".lock").read_text())["pid"] == first.pid:
          break
      except (OSError, ValueError, KeyError):
        pass
      time.sleep(0.2)
    else:
      pytest.fail("the first launcher never took the workdir's lock")
    os.kill(first.pid, signal.SIGSTOP)  # it keeps the lock while the second one tries
    second = launch(tmp_path, *short)
    assert second.returncode == 2, second.stderr[-2000:]
    assert (f"is in use by another launcher (pid {first.pid} on host {socket.gethostname()}"
            in second.stderr)
    assert "Traceback" not in second.stderr
  finally:
    first.kill()  # SIGKILL (a stopped process too): the OS drops its lock
    first.wait()
  third = launch(tmp_path, *short)
  assert third.returncode == 0, third.stderr[-2000:]
  assert (tmp_path / "results.json").exists() and not (tmp_path / ".lock").exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(cli.InputError, match="is not writable"):
    train.prepare_workdir(str(blocker / "workdir"))
  with pytest.raises(cli.InputError, match="MiB free"):
    train.prepare_workdir(str(tmp_path / "w"), min_free_bytes=1 << 62)


def test_disk_full_during_save_keeps_last_checkpoint(tmp_path, monkeypatch):
  ck = run_state.RunCheckpointer(str(tmp_path), keep=2)
  state = {"w": np.ones((3,), np.float32)}
  ck.save(1, state, {"n": 1})
  ck.wait()

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ck._manager, "save", full)
  with pytest.raises(run_state.CheckpointWriteError, match="the disk is full.*last complete"):
    ck.save(2, {"w": np.zeros((3,), np.float32)}, {"n": 2})
  monkeypatch.undo()
  abstract = run_state.with_shardings(jax.eval_shape(lambda: state),
                                      sharding.replicated(sharding.make_mesh()))
  restored, meta = ck.latest(abstract)
  assert meta == {"n": 1} and np.all(np.asarray(restored["w"]) == 1)
  ck.close()


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_keeps_good_checkpoint(tmp_path):
  # lr = inf: step 1's loss is finite but its update is not, so step 2's loss is NaN.
  p = launch(tmp_path, "--config.optim.lr=inf", "--config.train.checkpoint_every_steps=1")
  assert p.returncode == 3, p.stderr[-2000:]
  assert "non-finite loss" in p.stderr and "at global step 2" in p.stderr
  assert "task 0 epoch 0 step 1" in p.stderr
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "results.json").exists()
  ck = run_state.RunCheckpointer(str(tmp_path / "checkpoints"))
  assert ck.all_ids() == [1]  # the checkpoint of the last finite step is intact
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [line["step"] for line in lines if line["event"] == "step"] == [1]
  ck.close()


def test_checkpoint_from_other_code_is_reported_not_misread(tmp_path):
  ck = run_state.RunCheckpointer(str(tmp_path / "checkpoints"))
  ck.save(3, {"something_else": np.zeros((3,), np.float32)}, {"position": None})
  ck.close()
  with pytest.raises(checkpoints.CheckpointError, match="checkpoint 3 in .* does not fit this "
                     "learner"):
    train.run(tiny_config(), str(tmp_path), progress=False)


def test_resuming_with_another_config_is_refused(tmp_path):
  """A workdir resumes only its own run: a changed method section is named, `train` may change."""
  config = tiny_config(**{"train.mesh_data": 1})
  ck = run_state.RunCheckpointer(str(tmp_path / "checkpoints"))
  lrn = learner_lib.Learner(config, checkpoints.build_backbone(config),
                            sharding.make_mesh(1, devices=jax.devices()[:1]))
  state = lrn.init_state(jax.random.PRNGKey(0))
  cfg = json.loads(config.to_json_best_effort())
  other = json.loads(json.dumps(cfg))
  other["method"]["fix_old_pool"] = True
  other["train"]["log_every_steps"] = 7
  ck.save(1, state, {"config": other, "class_order": [int(c) for c in
                                                      np.random.RandomState(0).permutation(6)]})
  ck.close()
  with pytest.raises(cli.InputError, match=r"holds another run \(method.fix_old_pool: saved True, "
                                           r"asked False\)"):
    train.run(config, str(tmp_path), progress=False)
