"""Packaging: the wheel ships the configs in `ntkcl_jax.configs` (no top-level `configs`), an
installed (non-editable) copy finds and runs its configs from any directory, the JAX pins of
setup.py agree with the neural-tangents shims, and the neural-tangents backend stays optional."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from packaging.requirements import Requirement

from ntk_analysis import kernels, nt_compat
import _xla  # tests/_xla.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIGS = sorted(os.path.basename(p)
                         for p in glob.glob(os.path.join(ROOT, "ntkcl_jax", "configs", "*.py")))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """A wheel built from a copy of the sources (the build writes nothing into the checkout)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
  for d in ("ntkcl_jax", "ntk_analysis"):
    shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
  for f in ("setup.py", "MANIFEST.in", "README.md"):
    shutil.copy(os.path.join(ROOT, f), src / f)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  str(src), "-w", str(tmp / "whl")], check=True, capture_output=True, timeout=300)
  (path,) = glob.glob(str(tmp / "whl" / "ntkcl_jax-*.whl"))
  return path


def _requirements(wheel_path: str) -> list[Requirement]:
  with zipfile.ZipFile(wheel_path) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
  return [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
          if line.startswith("Requires-Dist:")]


@pytest.mark.slow
def test_wheel_ships_configs_inside_the_package(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    top_level = z.read(next(n for n in names if n.endswith("top_level.txt"))).decode().split()
  assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"ntkcl_jax", "ntk_analysis"}
  assert sorted(top_level) == ["ntk_analysis", "ntkcl_jax"]
  assert {n.split("/")[-1] for n in names if n.startswith("ntkcl_jax/configs/")} == set(SHIPPED_CONFIGS)
  assert "ntkcl_jax/data/demo_images/imagenette/train.zip" in names


@pytest.mark.slow
def test_installed_wheel_finds_and_runs_its_configs_from_any_directory(wheel, tmp_path):
  """A non-editable install (pip --target) used from a directory outside the checkout: every
  shipped config loads by its `configs/NAME.py` path, and the launcher trains the tiny config."""
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                  str(target), wheel], check=True, capture_output=True, timeout=300)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target), XLA_FLAGS=_xla.flags(), NTKCL_SHARED_DATA=str(elsewhere))
  names = [n for n in SHIPPED_CONFIGS if n not in ("__init__.py", "base.py", "config_args.py",
                                                    "dinov2s_real.py", "ntkcl_benchmarks.py")]
  code = f"""
import importlib.util, os

from ntkcl_jax import config_files

assert config_files.__file__.startswith({str(target)!r}), config_files.__file__
assert config_files.CONFIG_DIR == os.path.join({str(target)!r}, "ntkcl_jax", "configs")
assert importlib.util.find_spec("configs") is None
for name in {names!r} + ["ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k"]:
  config_files.load("configs/" + name)
print(config_files.load(config_files.DEFAULT_CONFIG).data.name)
"""
  p = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.split() == ["imagenette_demo"]  # the bundled images: no archives here
  p = subprocess.run([sys.executable, "-m", "ntkcl_jax.train", "--config=configs/tiny.py",
                      f"--workdir={tmp_path / 'wd'}", "--noprogress"], cwd=elsewhere, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert os.path.isfile(tmp_path / "wd" / "results.json")


@pytest.mark.slow
def test_jax_pins_agree_with_the_neural_tangents_shims(wheel):
  """The `ntk` extra pins a jax that nt_compat supports and the core range admits; the core range
  excludes 0.10.2 (miscompiles jit(jacrev(...)) on CPU) and admits the jax running these tests."""
  reqs = _requirements(wheel)
  core = [r for r in reqs if r.name == "jax" and r.marker is None]
  ntk = [r for r in reqs if r.name == "jax" and r.marker and r.marker.evaluate({"extra": "ntk"})]
  assert len(core) == 1 and len(ntk) == 1
  (pinned,) = [s.version for s in ntk[0].specifier if s.operator == "=="]
  assert pinned in nt_compat.SUPPORTED_JAX
  assert core[0].specifier.contains(pinned) and core[0].specifier.contains(jax.__version__)
  assert not core[0].specifier.contains("0.10.2")
  for extra, jax_extra in (("cuda", "cuda12"), ("cuda13", "cuda13"), ("tpu", "tpu")):
    (r,) = [r for r in reqs if r.name == "jax" and r.marker and r.marker.evaluate({"extra": extra})]
    assert r.extras == {jax_extra} and r.specifier == core[0].specifier
  assert not [r for r in reqs if r.name in ("grain", "neural-tangents")]
  # gs:// from the accelerator extras alone: etils' GCS backend (gcsfs), no TensorFlow needed
  for extra in ("cuda", "cuda13", "tpu"):
    (r,) = [r for r in reqs if r.name == "etils" and r.marker and r.marker.evaluate(
        {"extra": extra})]
    assert "epath-gcs" in r.extras


def test_python_versions_admitted():
  """python_requires admits 3.11-3.13 (jax 0.10.1 ships wheels for them; Colab runs 3.12)."""
  from packaging.specifiers import SpecifierSet  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "setup.py")) as f:
    line = next(l for l in f if "python_requires=" in l)
  spec = SpecifierSet(line.split('"')[1])
  assert all(spec.contains(v) for v in ("3.11.7", "3.12.0", "3.13.1"))
  assert not spec.contains("3.10.12")


def test_importing_the_package_does_not_import_neural_tangents():
  """Neither importing the package nor computing a kernel with the pure-JAX backend imports
  neural-tangents or its shims (only `ntk` users are held by neural-tangents' JAX pin)."""
  code = ("import sys, numpy as np, ntkcl_jax.train, ntk_analysis.analyse, "
          "ntk_analysis.measure, ntk_analysis.judge\n"
          "from ntk_analysis import kernels\n"
          "kernels.ntk_fn(lambda p, x: x @ p)(np.ones((3, 2), np.float32), "
          "np.ones((4, 3), np.float32))\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('neural_tangents', 'tensorflow', 'grain') or m == 'ntk_analysis.nt_compat'))")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS=_xla.flags()))
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip() == "[]"


def test_missing_neural_tangents_names_the_ntk_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "neural_tangents", None)  # as if not installed
  f = lambda p, x: x @ p
  with pytest.raises(ImportError) as e:
    kernels.empirical_ntk(f, np.ones((3, 2), np.float32), np.ones((4, 3), np.float32),
                          backend="neural_tangents")
  assert "not installed" in str(e.value)
  assert "bash install.sh ntk" in str(e.value) and "pip install 'ntkcl-jax[ntk]'" in str(e.value)


def test_install_script_rejects_unknown_extras():
  p = subprocess.run(["bash", os.path.join(ROOT, "install.sh"), "test,cdua"], capture_output=True,
                     text=True, timeout=60, env=dict(os.environ, PYTHON="/nonexistent/python"))
  assert p.returncode == 2
  assert "unknown extra 'cdua'" in p.stderr and "cuda" in p.stderr
