"""Bad input and faults: each stops with a clear message and loses nothing already saved."""
import errno
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import _train_standins as standins
from ntkcl_jax import sharding, train
from ntkcl_jax.checkpoints import run_state
from test_train import tiny_config

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_standins.py")
CONFIG = os.path.join(train.REPO_ROOT, "configs", "tiny.py")


def test_impossible_split_cli_message_and_exit_code(tmp_path):
  p = subprocess.run([sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={tmp_path}",
                      "--config.data.init_cls=7"], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert p.returncode == 2
  assert "impossible split: init_cls=7 is more than the 6 classes" in p.stderr
  assert "Traceback" not in p.stderr


def test_unknown_key_cli_exit_code(tmp_path):
  p = subprocess.run([sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={tmp_path}",
                      "--config.optim.batchsize=4"], capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and "did you mean optim.batch_size" in p.stderr
  assert "Traceback" not in p.stderr


def test_missing_backbone_checkpoint_names_the_path():
  config = tiny_config(**{"model.checkpoint": "/nonexistent/B_16.npz"})
  with pytest.raises(train.LauncherError, match="backbone checkpoint not found: '/nonexistent/B_16"):
    train.build_backbone(config)


def test_missing_data_path_is_reported(tmp_path):
  def no_data(config, pi, pc):
    raise FileNotFoundError("/no/such/dir/train.zip")
  comps = standins.COMPONENTS.__class__(standins.random_backbone, no_data, standins.Learner)
  with pytest.raises(train.LauncherError, match="data for 'synthetic' not found: .*train.zip"):
    train.run(tiny_config(), str(tmp_path), comps, progress=False)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(train.LauncherError, match="is not writable"):
    train.prepare_workdir(str(blocker / "workdir"))
  with pytest.raises(train.LauncherError, match="MiB free"):
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
  p = subprocess.run([sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={tmp_path}",
                      "--noprogress", "--config.optim.lr=inf",
                      "--config.train.checkpoint_every_steps=1"],
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert p.returncode == 3, p.stderr[-2000:]
  assert "non-finite loss" in p.stderr and "at global step 2" in p.stderr
  assert "task 0 epoch 0 step 1" in p.stderr  # the learner's own message is passed on
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
  with pytest.raises(train.LauncherError, match="checkpoint 3 in .* does not fit this learner"):
    train.run(tiny_config(), str(tmp_path), standins.COMPONENTS, progress=False)
