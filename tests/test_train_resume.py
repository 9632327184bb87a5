"""Pre-emption: the launcher SIGKILLed at chosen moments (mid-epoch between checkpoints, right
after a step checkpoint was started, right after a task-end checkpoint was started, in the eval
phase, before any checkpoint) or sent SIGTERM, and restarted with the same command, finishes with
the same results.json, metrics.jsonl and final state as an uninterrupted run; a partially written
checkpoint is never read."""
import glob
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ntkcl_jax import sharding
from ntkcl_jax.checkpoints import run_state, runs
import _xla  # tests/_xla.py

CONFIG = "configs/tiny.py"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The launcher, with one real function wrapped so that the process signals itself at event k:
# after the metrics line of train step k is written (`step:k`), or after checkpoint k's
# asynchronous save has started (`save:k`).
KILLER = """
import os, signal, sys, time
from ntkcl_jax import metric_writer, train
from ntkcl_jax.checkpoints import run_state

what, at, sig = sys.argv.pop(1), int(sys.argv.pop(1)), getattr(signal, sys.argv.pop(1))

def die():
  os.kill(os.getpid(), sig)
  time.sleep(0.1)  # let the handler run (SIGTERM) before the launcher goes on

if what == "step":
  write = metric_writer.MetricWriter.write
  def wrapped(self, record):
    write(self, record)
    if record.get("event") == "step" and record["step"] == at:
      die()
  metric_writer.MetricWriter.write = wrapped
else:
  save = run_state.RunCheckpointer.save
  def wrapped(self, ckpt_id, state, meta):
    save(self, ckpt_id, state, meta)
    if ckpt_id == at:
      die()
  run_state.RunCheckpointer.save = wrapped
train.main()
"""


def launch(workdir, *extra, kill=None, devices=8):
  env = dict(os.environ, XLA_FLAGS=_xla.flags(devices),
             JAX_PLATFORMS="cpu")
  prefix = [sys.executable, "-m", "ntkcl_jax.train"] if kill is None else [
      sys.executable, "-c", KILLER, *kill]
  return subprocess.run(prefix + [f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress",
                                  *extra], env=env, capture_output=True, text=True, timeout=600,
                        cwd=REPO)


def load(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  res.pop("wall_time_s")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return res, f.read()


def final_state(workdir):
  _, _, state, meta = runs.load_run(str(workdir))
  return ({jax.tree_util.keystr(k): np.asarray(v)
           for k, v in jax.tree_util.tree_leaves_with_path(state)}, meta["checkpoint_id"])


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_identical_results(tmp_path):
  ref = tmp_path / "ref"
  p = launch(ref)
  assert p.returncode == 0, p.stderr
  ref_results, ref_log = load(ref)

  # tiny: 3 tasks x 2 epochs x 3 batches; events = 18 steps + 3 task ends = 21, numbered 1..21;
  # checkpoints every 2 steps and at task ends. Event 7 = task 0's end, 9 = step 8 (a step save),
  # 13 = step 12, task 1's last step (its checkpoint resumes in the eval phase).
  work = tmp_path / "killed"
  left_tmp = []
  kills = [("step", 5), ("save", 7), ("save", 9), ("step", 9), ("save", 13)]
  for what, at in kills:
    sig = "SIGTERM" if (what, at) == ("step", 9) else "SIGKILL"
    p = launch(work, kill=(what, str(at), sig))
    if sig == "SIGTERM":
      # step 9 = event 10, between scheduled saves: SIGTERM (a pre-emption notice) there saves
      # that step, waits for the write and exits with 143.
      assert p.returncode == 143, p.stderr[-2000:]
      assert "SIGTERM: saved checkpoint 10" in p.stderr
      assert 10 in run_state.RunCheckpointer(str(work / "checkpoints")).all_ids()
    else:
      assert p.returncode == -signal.SIGKILL, (what, at, p.returncode, p.stderr[-2000:])
    assert not os.path.exists(work / "results.json")
    left_tmp += glob.glob(str(work / "checkpoints" / "*orbax-checkpoint-tmp*"))
  p = launch(work)
  assert p.returncode == 0, p.stderr
  assert "resuming" in p.stdout
  results, log = load(work)
  assert results == ref_results
  assert log == ref_log  # lines logged after the checkpoint a run resumed from were dropped
  (ref_state, ref_id), (state, cid) = final_state(ref), final_state(work)
  assert ref_id == cid == 21 and ref_state.keys() == state.keys()
  for k in ref_state:
    np.testing.assert_array_equal(state[k], ref_state[k], err_msg=k)
  # the killed-mid-save temporaries were cleaned up and never listed as checkpoints
  assert not glob.glob(str(work / "checkpoints" / "*orbax-checkpoint-tmp*"))
  # ... and at least one kill really did interrupt a save in flight (async saves: the kill comes
  # microseconds after the save started), so the partial-checkpoint path was exercised.
  assert left_tmp, "no kill interrupted a checkpoint write"


def test_partial_checkpoint_is_never_read(tmp_path):
  """A checkpoint directory that was not finalised (as a kill mid-save leaves it) is ignored."""
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
