"""Bad input and faults: each stops with a clear message and loses nothing already saved."""
import errno
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ntkcl_jax import checkpoints, cli, config_files, learner as learner_lib, sharding, train
from ntkcl_jax.checkpoints import run_state
from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/tiny.py"


def launch(workdir, *extra):
  return subprocess.run([sys.executable, "-m", "ntkcl_jax.train", f"--config={CONFIG}",
                         f"--workdir={workdir}", "--noprogress", *extra], capture_output=True,
                        text=True, timeout=300, cwd=REPO,
                        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))


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
  with pytest.raises(cli.InputError, match=r"different config \(sections \['method'\] differ\)"):
    train.run(config, str(tmp_path), progress=False)
