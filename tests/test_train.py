"""The launcher end to end with the real learner and data stream on configs/tiny.py: outputs,
their consistency, task-end checkpoints, and device-count invariance (8 fake CPU devices give
the same run as 1 device and as 4 devices)."""
import json
import os

import numpy as np
import pytest

from ntkcl_jax import cli, config_files, metrics, results, train
from ntkcl_jax.checkpoints import run_state

pytestmark = pytest.mark.filterwarnings("ignore")


def tiny_config(arg=None, **overrides):
  config = config_files.load_config_file("configs/tiny.py" + (f":{arg}" if arg else ""))
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One uninterrupted tiny run over all 8 fake devices (shared by several tests)."""
  workdir = str(tmp_path_factory.mktemp("tiny8"))
  return workdir, train.run(tiny_config(), workdir, progress=False)


def test_outputs_written_and_consistent(tiny_run):
  workdir, _ = tiny_run
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert set(results.RESULTS_KEYS) <= set(on_disk)
  r = np.array(on_disk["accuracy_matrix"], dtype=np.float64)  # null -> nan
  assert r.shape == (3, 3)
  assert np.isnan(r[np.triu_indices(3, 1)]).all() and not np.isnan(r[np.tril_indices(3)]).any()
  # Headline numbers follow from the saved matrix and per-step accuracies by the definitions.
  steps = on_disk["accuracy_per_step"]
  assert on_disk["avg_incremental_accuracy"] == pytest.approx(np.mean(steps))
  assert on_disk["last_accuracy"] == steps[-1]
  assert on_disk["forgetting"] == pytest.approx(metrics.forgetting(r))
  assert on_disk["backward_transfer"] == pytest.approx(metrics.backward_transfer(r))
  # Equal test counts per task here, so A_t is also the mean of row t (up to the 2-decimal rounding).
  for t in range(3):
    assert steps[t] == pytest.approx(np.mean(r[t, :t + 1]), abs=0.006)
  assert sorted(on_disk["class_order"]) == list(range(6))
  assert on_disk["class_order"] == list(np.random.RandomState(0).permutation(6))
  assert on_disk["config"]["data"]["num_classes"] == 6
  assert len(on_disk["old_new_accuracy"]) == 3 and on_disk["old_new_accuracy"][0]["old"] is None
  assert on_disk["topk_accuracy"]["k"] == 2
  assert all(k >= a for k, a in zip(on_disk["topk_accuracy"]["per_step"], steps))
  # Logs: one step line per train step (log_every_steps=1), one task_end line per task.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert lines[0]["event"] == "run_start"
  assert sum(line["event"] == "step" for line in lines) == 3 * 2 * 3  # tasks x epochs x batches
  assert [line["per_task"] for line in lines if line["event"] == "task_end"] == [
      row[:t + 1] for t, row in enumerate(on_disk["accuracy_matrix"])]
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tb")))
  for png in ("accuracy_matrix.png", "accuracy_per_task.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_of_finished_workdir_keeps_results(tiny_run):
  workdir, res = tiny_run
  again = train.run(tiny_config(), workdir, progress=False)
  assert again["accuracy_matrix"] == res["accuracy_matrix"]


@pytest.mark.slow
def test_one_device_equals_eight_devices_and_task_end_checkpoints_kept(tiny_run, tmp_path):
  _, res8 = tiny_run
  # checkpoints only at task ends, all kept: ids are the task-end events (6 steps + 1 per task)
  res1 = train.run(tiny_config(**{"train.mesh_data": 1, "train.checkpoint_every_steps": 0,
                                  "train.keep_checkpoints": 3}),
                   str(tmp_path / "d1"), progress=False)
  res4 = train.run(tiny_config(**{"train.mesh_data": 4}), str(tmp_path / "d4"), progress=False)
  for other in (res1, res4):
    assert other["accuracy_matrix"] == res8["accuracy_matrix"]
    np.testing.assert_allclose([list(l.values()) for l in other["losses"]],
                               [list(l.values()) for l in res8["losses"]], rtol=1e-5, atol=1e-7)
    assert other["class_order"] == res8["class_order"]
  ck = run_state.RunCheckpointer(str(tmp_path / "d1" / "checkpoints"))
  assert ck.all_ids() == [7, 14, 21]
  for t, cid in enumerate(ck.all_ids()):
    with open(tmp_path / "d1" / "checkpoints" / str(cid) / "meta" / "metadata") as f:
      meta = json.load(f)
    assert meta["position"] == {"task": t + 1, "epoch": 0, "batch": 0, "phase": "train"}
    assert len(meta["task_records"]) == t + 1
  ck.close()


def test_tasks_to_run_equals_the_first_tasks_of_the_whole_run(tiny_run, tmp_path):
  """data.tasks_to_run=2 trains and evaluates the first two tasks exactly as the whole run does
  (same class order, splits and EMA schedule), and refuses more tasks than the protocol has."""
  _, whole = tiny_run
  part = train.run(tiny_config(**{"data.tasks_to_run": 2}), str(tmp_path / "two"),
                   progress=False)
  assert part["accuracy_matrix"] == [row[:2] for row in whole["accuracy_matrix"][:2]]
  assert part["losses"] == whole["losses"][:2]
  assert part["class_order"] == whole["class_order"] and len(part["tasks"]) == 2
  assert part["oracle_prototypes"]["task"] == 1
  with pytest.raises(cli.InputError, match="tasks_to_run=4, but the protocol has only 3"):
    train.run(tiny_config(**{"data.tasks_to_run": 4}), str(tmp_path / "four"), progress=False)


def test_unknown_override_lists_valid_keys():
  with pytest.raises(cli.InputError) as e:
    config_files.from_argv(["prog", "--config=configs/tiny.py", "--config.optim.lrr=0.1"])
  msg = str(e.value)
  assert "optim.lrr" in msg and "did you mean optim.lr" in msg and "optim.weight_decay" in msg
  config, _, _ = config_files.from_argv(["prog", "--config=configs/tiny.py",
                                         "--config.optim.lr=0.1"])  # valid
  assert config.optim.lr == 0.1


def test_default_workdir_names_config_arg_and_seed():
  assert train.default_workdir("configs/demo.py", 0) == os.path.join("workdirs", "demo-seed0")
  assert train.default_workdir("configs/c.py:ckpt=/a/b", 3) == os.path.join(
      "workdirs", "c-ckpt=_a_b-seed3")


def test_task_record_official_rounding():
  rec = results.task_record({"task": 1, "per_task_accuracy": np.array([90.0, 80.0, np.nan]),
                             "top1": 2 / 3 * 100, "topk": 99.0, "old_accuracy": 90.0,
                             "new_accuracy": 80.0, "losses": {"loss": np.float32(0.5)}}, task=1)
  assert rec["per_task"] == [90.0, 80.0] and rec["top1"] == 66.67 and rec["task"] == 1
  assert rec["losses"] == {"loss": 0.5} and isinstance(rec["losses"]["loss"], float)


def test_position_after_each_step():
  """Batches of an epoch, then the next epoch, then the task's end (evaluation)."""
  assert train.after_step(1, 0, 0, 3, 2) == train.Position(1, 0, 1, "train")
  assert train.after_step(1, 0, 2, 3, 2) == train.Position(1, 1, 0, "train")
  assert train.after_step(1, 1, 2, 3, 2) == train.Position(1, 2, 0, "eval")
