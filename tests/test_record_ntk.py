"""train.record_ntk writes joint kernels at every task boundary without changing the run."""
import json
import os

import numpy as np
import pytest

from ntk_analysis import joint
from ntkcl_jax import train


def _config(record):
  c = train.load_config_file(os.path.join(train.REPO_ROOT, "configs", "tiny.py"))
  c.train.mesh_data = 1
  c.train.record_ntk = record
  c.train.record_ntk_per_task = 3
  return c


@pytest.mark.slow
def test_recording_kernels_leaves_results_identical(tmp_path):
  plain = train.run(_config(False), str(tmp_path / "plain"), progress=False)
  rec = train.run(_config(True), str(tmp_path / "rec"), progress=False)
  assert rec["accuracy_matrix"] == plain["accuracy_matrix"]
  assert rec["losses"] == plain["losses"]
  for t in range(3):
    out = tmp_path / "rec" / "ntk" / f"task{t}"
    jk = joint.JointKernel.load(str(out / "kernel_fused.npz"))
    assert jk.k.shape == (9, 9) and np.allclose(jk.k, jk.k.T, rtol=1e-5, atol=1e-6)
    with open(out / "report.json") as f:
      assert json.load(f)["checkpoint_id"] >= 1
  assert not (tmp_path / "plain" / "ntk").exists()
