"""`python -m ntk_analysis.analyse` on a real (tiny) training run: the saved joint kernel equals a
naive jax.jacrev J J^T of the same readout, blocks slice by task, and the outputs are written."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ntk_analysis import joint, readouts, run_data
from ntkcl_jax import config_files, data, train
from ntkcl_jax.checkpoints import runs
import _xla  # tests/_xla.py


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("tinyrun"))
  config = config_files.load_config_file("configs/tiny.py")
  config.train.mesh_data = 1
  train.run(config, wd, progress=False)
  return wd


def test_run_writes_kernels_report_and_plots(tiny_workdir):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "ntk_analysis.analyse", f"--workdir={tiny_workdir}",
                      "--n_per_task=4", "--views=fused,all", "--probes=4"], cwd=root,
                     capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, XLA_FLAGS=_xla.flags()))
  assert p.returncode == 0, p.stderr[-3000:]
  out = os.path.join(tiny_workdir, "ntk")
  for name in ("kernel_fused.npz", "kernel_all.npz", "report.json", "kernel_fused.png",
               "alignment_fused.png", "spectra_fused.png", "check_a_overlap_vs_forgetting.png"):
    assert os.path.exists(os.path.join(out, name)), name
  with open(os.path.join(out, "report.json")) as f:
    rep = json.load(f)
  assert set(rep["views"]) == {"fused", "all"}
  assert set(rep["views"]["fused"]["pairs"]) == {"0-1", "0-2", "1-2"}
  for pair in rep["views"]["fused"]["pairs"].values():
    assert 0 <= pair["rho"] <= 1 + 1e-9
  assert "prediction" in rep["check_a_overlap_vs_forgetting"]

  # independent check: naive J J^T of the same readout on the same images
  jk = joint.JointKernel.load(os.path.join(out, "kernel_fused.npz"))
  config, learner, state, _ = runs.load_run(tiny_workdir)
  images, _ = run_data.task_data(data.build_stream(config))
  x = np.concatenate([images[t][jk.indices[t]] for t in jk.tasks])  # the saved subsets
  assert all(len(jk.indices[t]) == 4 for t in jk.tasks) and len(jk.tasks) == 3
  f, params = readouts.model_readout(learner, state, "fused",
                                    readouts.probes(learner.spec.feature_dim, 4, 0))
  jac = jax.jacrev(f)(params, x)
  flat = np.concatenate([np.asarray(l).reshape(len(x), 4, -1)
                         for l in jax.tree_util.tree_leaves(jac)], -1)
  naive = np.einsum("aop,bop->ab", flat, flat) / 4  # traced sketch = mean over the 4 probes
  np.testing.assert_allclose(jk.k, naive, rtol=2e-4, atol=1e-6 * np.abs(naive).max())
  np.testing.assert_allclose(jk.block(0, 2), naive[:4, 8:], rtol=2e-4,
                             atol=1e-6 * np.abs(naive).max())


def test_extract_features_of_a_run_directory(tiny_workdir, tmp_path):
  """extract_features --checkpoint=WORKDIR: features and logits equal the model's own functions
  on the restored state, and the logits' argmax is the run's prediction rule."""
  from ntkcl_jax.models import ntkcl  # pylint: disable=g-import-not-at-top
  config, learner, state, _ = runs.load_run(tiny_workdir)
  images, labels = run_data.task_data(data.build_stream(config))
  x = np.concatenate([images[t][:3] for t in sorted(images)])
  np.save(tmp_path / "in.npy", x)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.tools.extract_features",
                      f"--checkpoint={tiny_workdir}", f"--images={tmp_path / 'in.npy'}",
                      f"--output={tmp_path / 'out.npz'}", "--batch_size=4"], cwd=root,
                     capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, XLA_FLAGS=_xla.flags()))
  assert p.returncode == 0, p.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  f = ntkcl.features(learner.spec, learner.backbone, learner.trainable(state),
                     learner.frozen(state), x, train=False)
  for k in ("channel", "patch", "fused"):
    np.testing.assert_allclose(out[k], np.asarray(f[k]), rtol=1e-4, atol=1e-5)
  logits = np.asarray(ntkcl.eval_logits(learner.spec, state["prototypes"], f["fused"], 6))
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-5)
  assert out["logits"].shape == (9, 6)
