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


def test_plan_rows_multiply_runs_by_steps_and_passes():
  step = {"official": 1.0, "corrected": 2.0, "channel": 0.5}
  rows = scale_plan.plan_rows(step, eval_s=10.0, steps=100, seeds=5, theory_step=0.2)
  (page1, n1, h1), (page2, n2, h2), (page3, n3, h3) = rows
  run = {m: 100 * s + 20.0 for m, s in step.items()}  # steps x s/step + two SimpleCIL passes
  # Imagenette trains faithful, bf16, init-PTM (all at faithful's step), corrected and channel;
  # CIFAR-10 the same but init-PTM; each dataset adds one SimpleCIL run per seed.
  per_seed = 5 * run["official"] + 2 * run["corrected"] + 2 * run["channel"] + 2 * 10.0
  assert n1 == 45 and h1 == pytest.approx(5 * per_seed / 3600)
  # Corrections: faithful, corrected and the six switches alone, two of the five tasks each.
  assert n2 == 5 * 8 and h2 == pytest.approx(
      5 * 2 / 5 * (7 * run["official"] + run["corrected"]) / 3600)
  assert n3 == 5 * scale_plan.THEORY_ARMS
  assert h3 == pytest.approx(5 * scale_plan.THEORY_ARMS * 1.5 * 100 * 0.2 / 3600)
  assert "results.md" in page1 and "corrections" in page2 and "theory" in page3


def test_page_lists_every_size_and_the_chosen_scale():
  res = {"avg_incremental_accuracy": 60.0, "last_accuracy": 45.0, "wall_time_s": 50.0}
  simple = {d: {56: [res], 112: [res]} for d in pages.DATASETS}
  t = {"step_s": 0.4, "compile_s": 30.0}
  steps = {56: {m: t for m in ("official", "corrected", "channel")},
           112: {m: dict(t, step_s=1.0) for m in ("official", "corrected", "channel")}}
  text = scale_plan.page(simple, steps, 0.1, [56, 112], [0], pages.DEFAULT_SCALE, "0.5",
                         "python -m scripts.scale_plan --sizes=56,112")
  assert "| imagenette | 112 px | 65 | 60.00 ± 0.00 | 45.00 ± 0.00 | 50 s |" in text
  assert "| 112 px | 1.000 | 1.000 | 1.000 | 30 |" in text
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
  steps = {56: {m: {"step_s": 0.4, "compile_s": 30.0} for m in ("official", "corrected",
                                                                  "channel")}}
  text = scale_plan.page(simple, steps, 0.1, [56], [0], pages.DEFAULT_SCALE, "0.5", "cmd",
                         measured=[700.0, 900.0, 1000.0])
  # model: 5 tasks x 100 steps x 0.4 s + 2 x 50 s = 300 s; median measured 900 s: 3.0x
  assert "3 finished trained runs at 56 px took a median of 900 s" in text
  assert "the model above gives 300-300 s per run" in text and "about 3.0 at 56 px" in text
