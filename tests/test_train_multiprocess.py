"""Multi-host start-up: two processes with 4 CPU devices each (jax.distributed on localhost, each
feeding its own rows of every batch, each listing half of the image folder's classes and the two
exchanging their listings) give the same run as one process with 8 devices."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import portpicker
import pytest
import _xla  # tests/_xla.py


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/tiny.py"


def _env(devices):
  return dict(os.environ, XLA_FLAGS=_xla.flags(devices),
              JAX_PLATFORMS="cpu")


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _write_kvasir(data_dir):
  """A tiny `Kvasir/{train,test}/<class>/` folder dataset (8 classes, class-coloured noise)."""
  rng = np.random.RandomState(0)
  for split, n in (("train", 6), ("test", 3)):
    for c in range(8):
      d = os.path.join(data_dir, "Kvasir", split, f"class_{c}")
      os.makedirs(d)
      for k in range(n):
        img = np.clip(rng.rand(12, 12, 3) * 0.4 + np.array([c % 2, c // 2 % 2, c // 4]) * 0.6, 0,
                      1)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(d, f"{k}.png"))


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  _write_kvasir(tmp_path / "data")
  base = [sys.executable, "-m", "ntkcl_jax.train", f"--config={CONFIG}", "--noprogress",
          "--config.data.name=kvasir", "--config.data.source=folder",
          f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.num_classes=8"]
  one = subprocess.run(base + [f"--workdir={tmp_path / 'one'}"], env=_env(8),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]

  port = portpicker.pick_unused_port()
  two_dir = tmp_path / "two"
  procs = [subprocess.Popen(base + [f"--workdir={two_dir}", f"--coordinator=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            env=_env(4), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "over 8 of 8 devices (2 processes)" in outs[0][0]
  assert "each of 2 hosts listed its share of the class folders" in outs[0][0]
  assert "listed its share" not in one.stdout
  r1, r2 = _results(tmp_path / "one"), _results(two_dir)
  assert len(r1["accuracy_matrix"]) == 4  # 8 classes in tasks of 2
  assert r2["accuracy_matrix"] == r1["accuracy_matrix"]
  assert r2["accuracy_per_step"] == r1["accuracy_per_step"]
  assert r2["class_order"] == r1["class_order"]
  np.testing.assert_allclose([list(l.values()) for l in r2["losses"]],
                             [list(l.values()) for l in r1["losses"]], rtol=1e-5, atol=1e-7)
