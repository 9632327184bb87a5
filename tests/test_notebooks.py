"""The Colab notebooks execute top to bottom at tiny scale (CPU), failing on any error."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ntk_of_a_run.ipynb", "theory_checks.ipynb"])
def test_notebook_runs_at_tiny_scale(name, tmp_path, monkeypatch):
  monkeypatch.setenv("NTKCL_NB_SCALE", "tiny")
  monkeypatch.setenv("NTKCL_NB_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "average incremental accuracy" in outputs
