"""Multi-host start-up: two processes with 4 CPU devices each (jax.distributed on localhost, each
feeding its own rows of every batch) give the same run as one process with 8 devices."""
import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from ntkcl_jax import config_files

CONFIG = os.path.join(config_files.REPO_ROOT, "configs", "tiny.py")


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu")


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  base = [sys.executable, "-m", "ntkcl_jax.train", f"--config={CONFIG}", "--noprogress"]
  one = subprocess.run(base + [f"--workdir={tmp_path / 'one'}"], env=_env(8), cwd=config_files.REPO_ROOT,
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]

  port = portpicker.pick_unused_port()
  two_dir = tmp_path / "two"
  procs = [subprocess.Popen(base + [f"--workdir={two_dir}", f"--coordinator=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            env=_env(4), cwd=config_files.REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "over 8 of 8 devices (2 processes)" in outs[0][0]
  r1, r2 = _results(tmp_path / "one"), _results(two_dir)
  assert r2["accuracy_matrix"] == r1["accuracy_matrix"]
  assert r2["accuracy_per_step"] == r1["accuracy_per_step"]
  assert r2["class_order"] == r1["class_order"]
  np.testing.assert_allclose([list(l.values()) for l in r2["losses"]],
                             [list(l.values()) for l in r1["losses"]], rtol=1e-5, atol=1e-7)
