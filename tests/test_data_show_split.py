"""`python -m ntkcl_jax.tools.show_split`: JSON protocol summaries of shipped configs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ntkcl_jax import data as data_lib
from ntkcl_jax import config_files
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _show(*args, cwd=REPO):
  r = subprocess.run([sys.executable, "-m", "ntkcl_jax.tools.show_split", *args], cwd=cwd,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "PYTHONPATH": REPO})
  return r


def test_tiny_with_seed_override_from_another_directory(tmp_path):
  r = _show(f"--config={REPO}/ntkcl_jax/configs/tiny.py", "--config.seed=3", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  np.random.seed(3)
  order = np.random.permutation(6).tolist()
  assert out["class_order"] == order
  assert out["task_classes"] == [order[0:2], order[2:4], order[4:6]]
  # counts equal those of the stream built from the same config
  c = config_files.load_config_file("configs/tiny.py")
  c.seed = 3
  assert out["counts"] == data_lib.build_stream(c).counts


def test_cifar100_counts_known_without_data():
  r = _show("--config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k",
            "--config.data.data_dir=/nonexistent")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["class_order"][:10] == [26, 86, 2, 55, 75, 93, 16, 73, 54, 95]  # docs/method.md §3.2
  assert out["counts"] == {"train": [5000] * 10, "test": [1000] * 10}
  assert "no data was read" in out["counts_from"]


def test_unknown_per_task_counts_are_null_with_totals():
  r = _show("--config=configs/ntkcl_benchmarks.py:benchmark=imagenet_r,backbone=in21k",
            "--config.data.data_dir=/nonexistent")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["num_tasks"] == 10 and out["counts"]["train"] == [None] * 10
  assert out["totals"] == {"train": 24000, "test": 6000}


def test_bad_class_count_is_a_clear_error():
  r = _show("--config=configs/tiny.py:data=digits", "--config.data.num_classes=7")
  assert r.returncode == 2 and "set --config.data.num_classes=10" in r.stderr


def test_demo_counts_from_archives(shared_data):
  del shared_data
  r = _show("--config=configs/demo.py")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  c = config_files.load_config_file("configs/demo.py")
  if c.data.source != "zip":
    pytest.skip("demo config does not use the archives here")
  assert out["counts"] == data_lib.build_stream(c).counts
  assert "no image decoded" in out["counts_from"]
