"""ntk_page.same_run_as: a theory sweep's base run is matched to an analysed run by configuration
(bookkeeping keys under train.* ignored), and a reproduced accuracy matrix is reported as such."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for scripts.*

from scripts import ntk_page  # noqa: E402


def _write(path, config, matrix):
  path.mkdir(parents=True)
  (path / "results.json").write_text(json.dumps({"config": config, "accuracy_matrix": matrix}))


def _config(**train):
  return {"method": {"name": "ntkcl", "variant": "official"}, "seed": 0,
          "train": {"keep_checkpoints": 2, "checkpoint_every_steps": 50, **train}}


def test_base_run_matched_by_config_and_accuracy(tmp_path):
  m = [[78.0, None], [59.0, 55.0]]
  _write(tmp_path / "sweep" / "base_seed0", _config(keep_checkpoints=6, checkpoint_every_steps=0), m)
  _write(tmp_path / "same", _config(), m)
  _write(tmp_path / "other", {**_config(), "seed": 1}, m)
  runs = {"other": str(tmp_path / "other"), "official": str(tmp_path / "same")}
  text = ntk_page.same_run_as(str(tmp_path / "sweep"), runs)
  assert "run `official`" in text and "reproduced exactly" in text

  _write(tmp_path / "drift", _config(), [[78.0, None], [59.0, 56.0]])
  text = ntk_page.same_run_as(str(tmp_path / "sweep"), {"official": str(tmp_path / "drift")})
  assert "**not** the same" in text
  assert ntk_page.same_run_as(str(tmp_path / "sweep"), {"other": str(tmp_path / "other")}) == ""
