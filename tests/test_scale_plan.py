"""scripts/scale_plan.py: the results page's scale at other image sizes, its SGD steps per task,
and the compute plan's arithmetic (closed forms), without training anything."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for scripts.*

from ntkcl_jax import cli  # noqa: E402
from scripts import pages, scale_plan  # noqa: E402


def test_the_results_page_scale_gives_100_steps_per_task_at_every_size():
  scale = pages.DEFAULT_SCALE
  assert scale_plan.steps_per_task(scale) == 100  # 2 classes x 200 images / batch 8 x 2 epochs
  assert scale_plan.at_size(scale, 112) == scale.replace("size=56", "size=112")
  assert scale_plan.steps_per_task("size=56,per_class=25,epochs=16,batch=8") == 7 * 16  # 50 / 8
  with pytest.raises(cli.InputError, match="no batch="):
    scale_plan.steps_per_task("size=56,per_class=25,epochs=16")


def _evaluated_images(per_class, test_per_class, tasks):
  """The images a run evaluates, counted task by task (2 classes per task)."""
  n = 0
  for t in range(tasks):
    n += 2 * per_class  # task t's training images -> its prototypes
    n += 2 * (t + 1) * test_per_class  # test images of every class seen so far
  return n + 2 * tasks * (per_class + test_per_class)  # oracle: prototypes again, then scored


def test_evaluated_images_count_prototypes_tests_and_the_oracle_pass():
  scale = pages.DEFAULT_SCALE  # 200 training and 200 test images per class
  assert scale_plan.pass_images(scale, 5) == _evaluated_images(200, 200, 5) == 12000
  assert scale_plan.pass_images(scale, 2) == _evaluated_images(200, 200, 2) == 3600
  assert scale_plan.pass_images("per_class=25,test_per_class=10", 3) == _evaluated_images(
      25, 10, 3)
  with pytest.raises(cli.InputError, match="no test_per_class="):
    scale_plan.pass_images("size=56,per_class=25", 5)


def test_plan_rows_multiply_runs_by_steps_and_passes():
  times = {m: {"step_s": s, "pass_s": p, "compile_s": 30.0}
           for m, s, p in (("official", 1.0, 0.01), ("corrected", 2.0, 0.01),
                           ("channel", 0.5, 0.004))}
  theory = {"step_s": 0.2, "pass_s": 0.002, "compile_s": 10.0}
  scale = pages.DEFAULT_SCALE
  rows = scale_plan.plan_rows(times, eval_s=10.0, scale=scale, seeds=5, theory=theory)
  (page1, n1, h1), (page2, n2, h2), (page3, n3, h3) = rows

  def run(t, tasks=5):  # steps x s/step + evaluated images x s/image + one compile
    return 100 * tasks * t["step_s"] + _evaluated_images(200, 200, tasks) * t["pass_s"] + t[
        "compile_s"]
  assert run(times["official"]) == pytest.approx(500 + 120 + 30)
  # Imagenette trains faithful, bf16, init-PTM (all at faithful's times), corrected and channel;
  # CIFAR-10 the same but init-PTM; each dataset adds one SimpleCIL run per seed.
  per_seed = (5 * run(times["official"]) + 2 * run(times["corrected"])
              + 2 * run(times["channel"]) + 2 * 10.0)
  assert n1 == 45 and h1 == pytest.approx(5 * per_seed / 3600)
  # Corrections: faithful, corrected and the six switches alone, two of the five tasks each.
  assert n2 == 5 * 8 and h2 == pytest.approx(
      5 * (7 * run(times["official"], 2) + run(times["corrected"], 2)) / 3600)
  assert n3 == 5 * scale_plan.THEORY_ARMS
  assert h3 == pytest.approx(5 * scale_plan.THEORY_ARMS * 1.5 * run(theory) / 3600)
  assert "results.md" in page1 and "corrections" in page2 and "theory" in page3


def test_page_lists_every_size_and_the_chosen_scale():
  res = {"avg_incremental_accuracy": 60.0, "last_accuracy": 45.0, "wall_time_s": 50.0}
  simple = {d: {56: [res], 112: [res]} for d in pages.DATASETS}
  t = {"step_s": 0.4, "pass_s": 0.01, "compile_s": 30.0}
  steps = {56: {m: t for m in ("official", "corrected", "channel")},
           112: {m: dict(t, step_s=1.0, pass_s=0.02) for m in ("official", "corrected",
                                                               "channel")}}
  theory = {"step_s": 0.1, "pass_s": 0.003, "compile_s": 10.0}
  text = scale_plan.page(simple, steps, theory, [56, 112], [0], pages.DEFAULT_SCALE, "0.5",
                         "python -m scripts.scale_plan --sizes=56,112")
  assert "| imagenette | 112 px | 65 | 60.00 ± 0.00 | 45.00 ± 0.00 | 50 s |" in text
  assert "| 112 px | 1.000 | 1.000 | 1.000 | 20.0 | 20.0 | 30 |" in text
  assert "0.100 s/step and 3.0 ms per evaluated image" in text
  assert "a whole run evaluates 12000 images" in text
  assert scale_plan.CHOSEN in text and "100 SGD steps per task" in text


def test_theory_arm_count_is_the_sweeps_plan():
  from ntkcl_jax import config_files  # pylint: disable=import-outside-toplevel
  from scripts import theory  # pylint: disable=import-outside-toplevel
  config = config_files.load("configs/theory_dinov2s.py:size=56,per_class=200,test_per_class=200,"
                             "epochs=2")
  assert len(theory.plan(config)) == scale_plan.THEORY_ARMS


def test_page_sets_finished_wall_times_beside_the_model():
  res = {"avg_incremental_accuracy": 60.0, "last_accuracy": 45.0, "wall_time_s": 50.0}
  simple = {d: {56: [res]} for d in pages.DATASETS}
  steps = {56: {m: {"step_s": 0.4, "pass_s": 0.01, "compile_s": 30.0}
                for m in ("official", "corrected", "channel")}}
  steps[56]["channel"] = {"step_s": 0.2, "pass_s": 0.005, "compile_s": 20.0}
  text = scale_plan.page(simple, steps, steps[56]["official"], [56], [0], pages.DEFAULT_SCALE,
                         "0.5", "cmd", measured=[("official", 700.0), ("official_bf16", 875.0),
                                                 ("channel", 360.0)])
  # model: 500 steps x 0.4 s + 12000 images x 0.01 s + 30 s = 350 s (channel: 100 + 60 + 20 =
  # 180 s); measured / model: 2.0, 2.5 (bf16 against faithful's model), 2.0
  assert "3 finished trained runs at 56 px took a median of 700 s" in text
  assert "the model above gives 180-350 s per run" in text
  assert "median 2.00, range 2.00-2.50" in text
