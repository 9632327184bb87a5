"""Pre-emption: a run SIGKILLed at chosen moments (mid-epoch between checkpoints, right after a
step checkpoint was started, right after a task-end checkpoint was started, before any checkpoint)
and restarted with the same command finishes with the same results.json and metrics.jsonl as an
uninterrupted run; a partially written checkpoint is never read."""
import glob
import json
import os
import signal
import subprocess

import pytest

import _train_standins as standins
from ntkcl_jax import train
from ntkcl_jax.checkpoints import run_state

CONFIG = os.path.join(train.REPO_ROOT, "configs", "tiny.py")


def launch(kind, workdir, *extra, devices=8):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run(standins.launcher_argv(kind) + [
      f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress", *extra], env=env,
      capture_output=True, text=True, timeout=600, cwd=train.REPO_ROOT)


def load(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  res.pop("wall_time_s")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return res, f.read()


@pytest.mark.slow
@pytest.mark.parametrize("kind", standins.KINDS)
def test_sigkill_at_several_points_then_resume_gives_identical_results(kind, tmp_path):
  standins.skip_unless_real(kind)
  ref = tmp_path / "ref"
  p = launch(kind, ref)
  assert p.returncode == 0, p.stderr
  ref_results, ref_log = load(ref)

  # tiny: 3 tasks x 2 epochs x 3 batches; events = 18 steps + 3 task ends = 21, numbered 1..21;
  # checkpoints every 2 steps and at task ends. Event 7 = task 0's end, 9 = step 8 (a step save).
  work = tmp_path / "killed"
  left_tmp = []
  # Event 10 = step 9, between scheduled saves: SIGTERM (a pre-emption notice) there saves that
  # step, waits for the write and exits with 143.
  for kill_at in (1, 5, 7, 9, -10, 16):
    p = launch(kind, work, f"--debug_kill_at_event={kill_at}")
    if kill_at < 0:
      assert p.returncode == 143, p.stderr[-2000:]
      assert "SIGTERM: saved checkpoint 10" in p.stderr
      assert 10 in run_state.RunCheckpointer(str(work / "checkpoints")).all_ids()
    else:
      assert p.returncode == -signal.SIGKILL, (kill_at, p.returncode, p.stderr[-2000:])
    assert not os.path.exists(work / "results.json")
    left_tmp += glob.glob(str(work / "checkpoints" / "*orbax-checkpoint-tmp*"))
  p = launch(kind, work)
  assert p.returncode == 0, p.stderr
  assert "resuming" in p.stdout
  results, log = load(work)
  assert results == ref_results
  assert log == ref_log  # lines logged after the checkpoint a run resumed from were dropped
  # the killed-mid-save temporaries were cleaned up and never listed as checkpoints
  assert not glob.glob(str(work / "checkpoints" / "*orbax-checkpoint-tmp*"))
  # ... and at least one kill really did interrupt a save in flight (async saves: the kill comes
  # microseconds after the save started), so the partial-checkpoint path was exercised.
  assert left_tmp, "no kill interrupted a checkpoint write"



def test_partial_checkpoint_is_never_read(tmp_path):
  """A checkpoint directory that was not finalised (as a kill mid-save leaves it) is ignored."""
  import numpy as np
  from ntkcl_jax.checkpoints import run_state
  from ntkcl_jax import sharding
  import jax
  ck = run_state.RunCheckpointer(str(tmp_path), keep=3)
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "rng": jax.random.PRNGKey(3),
           "typed_key": jax.random.key(5)}
  ck.save(4, state, {"position": {"task": 1}})
  ck.wait()
  # what a process killed during orbax's write leaves behind: a tmp dir with a partial payload
  partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 10)
  ck.close()
  ck = run_state.RunCheckpointer(str(tmp_path), keep=3)
  assert ck.all_ids() == [4]
  abstract = run_state.with_shardings(jax.eval_shape(lambda: state),
                                      sharding.replicated(sharding.make_mesh()))
  restored, meta = ck.latest(abstract)
  np.testing.assert_array_equal(restored["w"], state["w"])
  np.testing.assert_array_equal(restored["rng"], state["rng"])
  assert jax.numpy.issubdtype(restored["typed_key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["typed_key"]),
                                jax.random.key_data(state["typed_key"]))
  assert meta["position"] == {"task": 1}
  ck.close()
