"""The Colab notebooks execute top to bottom at tiny scale (CPU), failing on any error, from a
working directory outside the repository (as Colab's /content); their install cell picks the
runtime's JAX extra, skips the install when the package is importable, and fails clearly."""
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient
import _xla  # tests/_xla.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ["ntk_of_a_run.ipynb", "theory_checks.ipynb"]


def _install_cell(name="ntk_of_a_run.ipynb") -> str:
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def test_notebooks_share_the_install_cell():
  assert _install_cell(NOTEBOOKS[0]) == _install_cell(NOTEBOOKS[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_at_tiny_scale(name, tmp_path, monkeypatch):
  monkeypatch.setenv("NTKCL_NB_SCALE", "tiny")
  monkeypatch.setenv("NTKCL_NB_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("NTKCL_NB_SOURCE", ROOT)  # the checkout (installed already: skipped)
  monkeypatch.setenv("XLA_FLAGS", _xla.flags())
  content = tmp_path / "content"  # Colab's working directory: outside the repository
  content.mkdir()
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(content)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert f"ntkcl-jax is installed ({ROOT}); skipping the install" in outputs
  assert "backend 'cpu'" in outputs and "RUNS ON CPU" not in outputs
  assert f"configs: {os.path.join(ROOT, 'ntkcl_jax', 'configs')}" in outputs
  assert "average incremental accuracy" in outputs


# Hides the editable install of ntkcl_jax (install.sh's; its finder is activated by a .pth file at
# start-up) from a fresh interpreter, as on a runtime where it is not installed yet.
HIDE_PACKAGE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def _run_install_cell(tmp_path, env_extra, fake_nvidia_smi=False):
  """The install cell in a fresh interpreter that cannot import ntkcl_jax, from an empty working
  directory."""
  work = tmp_path / "content"
  work.mkdir(exist_ok=True)
  env = {k: v for k, v in os.environ.items()
         if k not in ("NTKCL_NB_SOURCE", "COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE",
                      "PYTHONPATH")}
  env["XLA_FLAGS"] = _xla.flags()
  env.update(env_extra)
  if fake_nvidia_smi:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake GPU'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
  return subprocess.run([sys.executable, "-c", HIDE_PACKAGE + _install_cell()], cwd=work, env=env,
                        capture_output=True, text=True, timeout=300)


def _fake_checkout(tmp_path):
  """A folder that looks like a checkout; its install.sh records its argument and $PYTHON and
  "installs" an empty ntkcl_jax package into the cell's working directory (on its sys.path)."""
  src = tmp_path / "fake_checkout"
  (src / "ntkcl_jax").mkdir(parents=True)
  (src / "setup.py").write_text("")
  (src / "install.sh").write_text(f'echo "$1 $PYTHON" > {tmp_path / "called"}\n'
                                  'mkdir -p ntkcl_jax && touch ntkcl_jax/__init__.py\n')
  return src


@pytest.mark.parametrize("env,fake_gpu,extra", [
    ({}, True, "cuda"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-1"}, False, "tpu"),
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, False, "tpu"),
])
def test_install_cell_installs_the_runtime_extra_and_warns_when_jax_is_on_cpu(
    tmp_path, env, fake_gpu, extra):
  """An accelerator runtime gets `bash install.sh cuda|tpu`; JAX here only has the CPU, so the
  cell must say loudly that the accelerator is not used."""
  src = _fake_checkout(tmp_path)
  p = _run_install_cell(tmp_path, dict(env, NTKCL_NB_SOURCE=str(src)), fake_nvidia_smi=fake_gpu)
  assert (tmp_path / "called").read_text().split() == [extra, sys.executable], p.stderr[-3000:]
  assert f"installing ntkcl-jax from {src} for a {extra} runtime" in p.stdout
  assert f"THIS IS A {extra.upper()} RUNTIME BUT JAX RUNS ON CPU" in p.stdout, p.stderr[-3000:]


@pytest.mark.parametrize("source,message", [
    ("", "ntkcl-jax is not installed and no checkout was found: set NTKCL_SOURCE"),
    ("{tmp}", "is a folder but not an ntkcl-jax checkout"),
    ("file:///nonexistent/ntkcl-jax.git", "git clone file:///nonexistent/ntkcl-jax.git failed"),
    ("ntkcl-jax-main", "is neither a folder nor a git URL"),
])
def test_install_cell_fails_clearly_without_a_usable_source(tmp_path, source, message):
  p = _run_install_cell(tmp_path, {"NTKCL_NB_SOURCE": source.format(tmp=tmp_path)})
  assert p.returncode != 0
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("RuntimeError: ") and message in last, p.stderr[-3000:]
  assert not (tmp_path / "called").exists()


def test_install_cell_says_restart_when_the_install_is_not_importable(tmp_path):
  """An install.sh that succeeds without making ntkcl_jax importable here: the cell stops with
  the restart advice instead of failing later on an import."""
  src = _fake_checkout(tmp_path)
  (src / "install.sh").write_text("true\n")
  p = _run_install_cell(tmp_path, {"NTKCL_NB_SOURCE": str(src)})
  assert p.returncode != 0
  assert "ntkcl-jax was installed but this kernel cannot import it" in p.stderr, p.stderr[-3000:]
