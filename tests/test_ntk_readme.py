"""The README's NTK analysis of its default run: `python -m ntkcl_jax.train` (configs/demo.py)
then the README's `python -m ntk_analysis.analyse` line as written, on a test-sized subset of the
same configuration; and input errors of the analysis CLI are one line, not a traceback."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from ntk_analysis import joint
from ntkcl_jax import config_files

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _readme_analysis_args():
  """The flags of the README's `python -m ntk_analysis.analyse` line (comment dropped)."""
  with open(os.path.join(config_files.REPO_ROOT, "README.md")) as f:
    lines = [l for l in f.read().splitlines() if l.startswith("python -m ntk_analysis.analyse ")]
  assert len(lines) == 1, lines
  return shlex.split(lines[0].split("#")[0])[3:]


@pytest.mark.slow
def test_readme_analysis_of_the_default_run(tmp_path):
  """Runs where users run it: without ../shared/data (NTKCL_SHARED_DATA hides it), so the demo
  trains on the images shipped in the package, as on any machine."""
  empty = tmp_path / "no_shared_data"
  empty.mkdir()
  env = dict(ENV, NTKCL_SHARED_DATA=str(empty))
  wd = tmp_path / "demo-seed0"
  # the default config (configs/demo.py), fewer images and one epoch so that it trains quickly
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.train", f"--workdir={wd}", "--noprogress",
                      "--config.data.max_per_class_train=8", "--config.data.max_per_class_test=4",
                      "--config.optim.epochs=1"], cwd=config_files.REPO_ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  assert "source=bundled" in p.stdout, p.stdout[-2000:]
  args = _readme_analysis_args()
  assert args[0] == "--workdir=workdirs/demo-seed0", args  # train's default workdir
  args = [f"--workdir={wd}"] + args[1:]
  p = subprocess.run([sys.executable, "-m", "ntk_analysis.analyse"] + args,
                     cwd=config_files.REPO_ROOT, env=env, capture_output=True, text=True,
                     timeout=1800)
  assert p.returncode == 0, p.stderr[-4000:]
  with open(wd / "ntk" / "report.json") as f:
    rep = json.load(f)
  assert set(rep["views"]) == {"fused", "channel", "patch", "all"}
  ks = {v: joint.JointKernel.load(str(wd / "ntk" / f"kernel_{v}.npz")) for v in rep["views"]}
  for v, jk in ks.items():
    n = 5 * rep["n_per_task"]
    assert jk.k.shape == (n, n) and np.isfinite(jk.k).all(), v
    np.testing.assert_allclose(jk.k, jk.k.T, rtol=1e-6, atol=1e-9 * np.abs(jk.k).max())
    assert np.linalg.eigvalsh(jk.k).min() > -1e-5 * np.abs(jk.k).max(), v  # a Gram matrix
    assert np.trace(jk.k) > 0, v
  # each single view's Jacobian is only over the parameters it depends on
  assert rep["views"]["channel"]["profile"]["P_active"] < rep["views"]["fused"]["profile"][
      "P_active"]


def test_analysis_of_a_directory_that_is_not_a_run_is_one_error_line(tmp_path):
  p = subprocess.run([sys.executable, "-m", "ntk_analysis.analyse", f"--workdir={tmp_path}"],
                     cwd=config_files.REPO_ROOT, env=dict(ENV, NTKCL_TRACEBACK=""), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  errors = [l for l in p.stderr.splitlines() if re.search(r"\berror:", l)]
  assert len(errors) == 1 and "checkpoints" in errors[0], p.stderr
  assert "Traceback" not in p.stderr
