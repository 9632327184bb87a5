"""scripts/grid.py, the drivers' one helper: a run trained only when its workdir holds no finished
run of the same config, by the launcher's own same-run rule (ntkcl_jax/same_run.py: a key added
to the schema with a default names the same run, for both); scripts/multi_seed.py on top of it
(seeds trained once, then reused; mean ± sample std table)."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for scripts.*

from ntkcl_jax import cli  # noqa: E402
from ntkcl_jax import config_files  # noqa: E402
from ntkcl_jax import same_run  # noqa: E402
from ntkcl_jax import train  # noqa: E402
from ntkcl_jax.configs import base  # noqa: E402
from scripts import grid  # noqa: E402
from scripts import multi_seed  # noqa: E402

TINY = "configs/tiny.py"


def _fake_run(calls):
  """Stands in for ntkcl_jax.train.run: records the call, writes results.json as train.run does
  (the config saved with the results) and returns the results."""
  def run(config, workdir, *, progress=True):
    calls.append((config.seed, config.optim.epochs, workdir, progress))
    results = {"config": json.loads(config.to_json_best_effort()),
               "avg_incremental_accuracy": 80.0 + config.seed, "last_accuracy": 70.0,
               "forgetting": 1.0, "backward_transfer": -1.0, "topk_accuracy": None}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    return results
  return run


def test_trains_once_then_reuses_the_finished_run(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(grid.train, "run", _fake_run(calls))
  config = config_files.load(TINY, ["--config.seed=2"])
  wd = str(tmp_path / "run")
  first = grid.train_unless_finished(config, wd, progress=False, log=lambda m: None)
  assert calls == [(2, config.optim.epochs, wd, False)]
  assert first["avg_incremental_accuracy"] == 82.0
  # finished: read back, not retrained, also when only train.* bookkeeping changed
  again = config_files.load(TINY, ["--config.seed=2", "--config.train.log_every_steps=3",
                                  "--config.train.checkpoint_every_steps=7"])
  assert grid.train_unless_finished(again, wd) == first
  assert len(calls) == 1


def test_a_corrected_mode_switch_makes_another_run(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(grid.train, "run", _fake_run(calls))
  config = config_files.load(TINY)
  wd = tmp_path / "run"
  saved = grid.train_unless_finished(config, str(wd), log=lambda m: None)
  assert grid.finished_results(config, str(wd)) == saved
  on = config_files.load(TINY, ["--config.method.fix_ema=true"])
  with pytest.raises(cli.InputError, match=r"method.fix_ema: saved False, asked True"):
    grid.finished_results(on, str(wd))
  assert len(calls) == 1


def test_a_finished_run_of_another_config_is_not_overwritten(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(grid.train, "run", _fake_run(calls))
  wd = str(tmp_path / "run")
  grid.train_unless_finished(config_files.load(TINY), wd, log=lambda m: None)
  other = config_files.load(TINY, ["--config.seed=1", "--config.optim.epochs=5"])
  with pytest.raises(cli.InputError, match=r"holds a finished run of another config \(optim.epochs: "
                                           r"saved 2, asked 5; seed: saved 0, asked 1\)"):
    grid.train_unless_finished(other, wd)
  assert len(calls) == 1


def test_a_corrupt_results_file_is_an_input_error(tmp_path):
  (tmp_path / "results.json").write_text("not json")
  with pytest.raises(ValueError, match="results.json is not a results.json"):
    grid.finished_results(config_files.load(TINY), str(tmp_path))
  (tmp_path / "results.json").write_text(json.dumps({"avg_incremental_accuracy": 1.0}))
  with pytest.raises(ValueError, match="has no config"):
    grid.finished_results(config_files.load(TINY), str(tmp_path))


@pytest.mark.slow
def test_real_tiny_run_then_reuse(tmp_path, monkeypatch):
  """With the real launcher: the run trains to results.json, and a second call reads it back."""
  config = config_files.load(TINY, ["--config.optim.epochs=1"])
  wd = str(tmp_path / "tiny")
  trained = grid.train_unless_finished(config, wd, progress=False, log=lambda m: None)
  with open(os.path.join(wd, "results.json")) as f:
    saved = json.load(f)
  assert saved["avg_incremental_accuracy"] == pytest.approx(trained["avg_incremental_accuracy"])
  assert len(saved["accuracy_matrix"]) == 3  # 6 classes in tasks of 2

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(grid.train, "run", no_training)
  assert grid.train_unless_finished(config, wd) == saved


@pytest.mark.slow
def test_launcher_and_grid_agree_on_an_old_run_after_a_key_is_added(tmp_path, monkeypatch):
  """A real tiny run, then the schema grows a key with a default: the grid reads the old run as
  finished and the launcher resumes it (nothing to train), for the new key at its default; at
  another value both refuse, naming the key with both values."""
  wd = str(tmp_path / "tiny")
  config = config_files.load(TINY, ["--config.optim.epochs=1"])
  old = train.run(config, wd, progress=False)
  schema = base.get_config

  def grown():
    c = schema()
    c.method.new_knob = 7
    return c
  monkeypatch.setattr(base, "get_config", grown)
  config.unlock()
  config.method.new_knob = 7
  assert grid.finished_results(config, wd) == old
  assert train.run(config, wd, progress=False)["accuracy_matrix"] == old["accuracy_matrix"]
  config.method.new_knob = 8
  for refuse in (lambda: grid.finished_results(config, wd),
                 lambda: train.run(config, wd, progress=False)):
    with pytest.raises(cli.InputError, match="method.new_knob: saved 7, asked 8"):
      refuse()


def test_the_rule_names_each_differing_key_with_both_values():
  saved = same_run.config_json(config_files.load(TINY))
  asked = config_files.load(TINY, ["--config.optim.lr=0.5", "--config.train.log_every_steps=1"])
  assert same_run.differences(saved, asked) == [("optim.lr", 0.05, 0.5)]  # train.* ignored
  assert same_run.describe(same_run.differences(saved, asked)) == "optim.lr: saved 0.05, asked 0.5"
  del saved["data"]["tasks_to_run"]  # a record written before the key existed
  assert same_run.differences(saved, config_files.load(TINY)) == []


def test_moving_the_data_or_weights_keeps_the_run_and_another_folder_does_not():
  """A clone whose data sits under another root (CI's ../shared/data) reads the same finished
  runs; a different data folder or weights file is another run."""
  saved = same_run.config_json(config_files.load(
      TINY, ["--config.data.data_dir=/work/shared/data/cifar10",
             "--config.model.checkpoint=/w/weights/dinov2_vits14.pth"]))
  moved = config_files.load(TINY, ["--config.data.data_dir=/check/work/shared/data/cifar10/",
                                   "--config.model.checkpoint=/ckpt/dinov2_vits14.pth"])
  assert same_run.differences(saved, moved) == []
  other = config_files.load(TINY, ["--config.data.data_dir=/work/shared/data/cifar100",
                                   "--config.model.checkpoint=/w/weights/dinov2_vitb14.pth"])
  assert same_run.differences(saved, other) == [
      ("data.data_dir", "cifar10", "cifar100"),
      ("model.checkpoint", "dinov2_vits14.pth", "dinov2_vitb14.pth")]


def test_multi_seed_trains_each_seed_once_and_tabulates(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(grid.train, "run", _fake_run(calls))
  args = [f"--config={TINY}", f"--workdir={tmp_path}", "--seeds=0,2", "--config.optim.epochs=1",
          "--noprogress"]
  assert multi_seed.main(args) == 0
  assert calls == [(0, 1, str(tmp_path / "seed0"), False), (2, 1, str(tmp_path / "seed2"), False)]
  table = (tmp_path / "summary.md").read_text()
  # Ā 80 and 82: mean 81, sample std sqrt(2) = 1.41
  assert "| Ā (avg. incremental acc.) | 80.00 | 82.00 | 81.00 ± 1.41 |" in table
  assert f"--workdir={tmp_path / 'seed2'} --config.optim.epochs=1 --config.seed=2" in \
      capsys.readouterr().out
  # rerun with one more seed: the finished seeds are reused, only seed 1 trains
  assert multi_seed.main(args[:2] + ["--seeds=0,1,2", "--config.optim.epochs=1"]) == 0
  assert [c[0] for c in calls] == [0, 2, 1]
  assert "| A_T (last acc.) | 70.00 | 70.00 | 70.00 | 70.00 ± 0.00 |" in \
      (tmp_path / "summary.md").read_text()


def test_multi_seed_table_mean_and_sample_std():
  runs = {0: {"avg_incremental_accuracy": 80.0, "last_accuracy": 70.0, "forgetting": 5.0,
              "backward_transfer": -4.0, "topk_accuracy": {"k": 5, "average": 95.0}},
          1: {"avg_incremental_accuracy": 84.0, "last_accuracy": 74.0, "forgetting": None,
              "backward_transfer": -2.0, "topk_accuracy": {"k": 5, "average": 97.0}}}
  table = multi_seed.markdown_table(runs)
  # mean 82, sample std sqrt(((80-82)^2 + (84-82)^2) / 1) = 2.83
  assert "| Ā (avg. incremental acc.) | 80.00 | 84.00 | 82.00 ± 2.83 |" in table
  assert "| forgetting (max-based) | 5.00 | n/a | n/a |" in table
  assert "| top-5 Ā | 95.00 | 97.00 | 96.00 ± 1.41 |" in table
  assert table.splitlines()[1] == "|---|---|---|---|"
