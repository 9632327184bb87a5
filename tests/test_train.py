"""The launcher end to end on the tiny config: outputs, their consistency, and device-count
invariance (8 fake CPU devices give the same run as 1 device)."""
import json
import os

import numpy as np
import pytest

from ntkcl_jax import metrics, train
import _train_standins as standins

pytestmark = pytest.mark.filterwarnings("ignore")


def tiny_config(arg=None, **overrides):
  config = train.load_config_file(os.path.join(train.REPO_ROOT, "configs", "tiny.py")
                                  + (f":{arg}" if arg else ""))
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def components(kind):
  standins.skip_unless_real(kind)
  return standins.COMPONENTS if kind == "standin" else train.default_components()


@pytest.fixture(scope="module", params=standins.KINDS)
def tiny_run(request, tmp_path_factory):
  """One uninterrupted tiny run over all 8 fake devices (shared by several tests), with the
  stand-in learner and, once they exist, the real learner and data stream."""
  comps = components(request.param)
  workdir = str(tmp_path_factory.mktemp("tiny8"))
  results = train.run(tiny_config(), workdir, comps, progress=False)
  return workdir, results, comps


def test_outputs_written_and_consistent(tiny_run):
  workdir, results, _ = tiny_run
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert set(train.RESULTS_KEYS) <= set(on_disk)
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


def test_rerun_of_finished_workdir_keeps_results(tiny_run, tmp_path):
  workdir, results, comps = tiny_run
  again = train.run(tiny_config(), workdir, comps, progress=False)
  assert again["accuracy_matrix"] == results["accuracy_matrix"]


def _strip(results):
  return {k: v for k, v in results.items() if k not in ("wall_time_s", "config")}


@pytest.mark.slow
def test_one_device_equals_eight_devices(tiny_run, tmp_path):
  _, res8, comps = tiny_run
  res1 = train.run(tiny_config(**{"train.mesh_data": 1}), str(tmp_path / "d1"), comps,
                   progress=False)
  res42 = train.run(tiny_config(**{"train.mesh_data": 4, "train.mesh_model": 2}),
                    str(tmp_path / "d42"), comps, progress=False)
  for other in (res1, res42):
    assert other["accuracy_matrix"] == res8["accuracy_matrix"]
    np.testing.assert_allclose([list(l.values()) for l in other["losses"]],
                               [list(l.values()) for l in res8["losses"]], rtol=1e-5, atol=1e-7)
    assert other["class_order"] == res8["class_order"]


def test_unknown_override_lists_valid_keys():
  with pytest.raises(train.LauncherError) as e:
    train.check_overrides(["--config=configs/tiny.py", "--config.optim.lrr=0.1"])
  msg = str(e.value)
  assert "optim.lrr" in msg and "did you mean optim.lr" in msg and "optim.weight_decay" in msg
  train.check_overrides(["--config=configs/tiny.py", "--config.optim.lr=0.1"])  # valid: no error


def test_default_workdir_names_config_arg_and_seed():
  assert train.default_workdir("configs/demo.py", 0) == os.path.join("workdirs", "demo-seed0")
  assert train.default_workdir("configs/c.py:ckpt=/a/b", 3) == os.path.join(
      "workdirs", "c-ckpt=_a_b-seed3")


def test_task_result_normalisation_and_official_rounding():
  rec = train.normalize_task_result({"per_task_accuracy": np.array([90.0, 80.0, np.nan]),
                                     "top1": 2 / 3 * 100, "topk": 99.0}, task=1)
  assert rec["per_task"] == [90.0, 80.0] and rec["top1"] == 66.67 and rec["task"] == 1
  with pytest.raises(KeyError, match="expected per_task_accuracy and top1"):
    train.normalize_task_result({"accuracy_row": [1.0]}, task=0)
