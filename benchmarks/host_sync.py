r"""Host syncs per train step and launcher step time, by `train.log_every_steps`.

    python -m benchmarks.host_sync                         # tiny + DINOv2-S/14-sized, ~5 min
    python -m benchmarks.host_sync --models=tiny --log_every=1,10,50 --steps=100

What is run: `ntkcl_jax.train.run` itself (data stream, device prefetch, jitted step with the
state donated, logging) on synthetic images, 2 tasks, checkpoints only at task ends, one device;
`tiny` is configs/tiny.py's ViT, `DINOv2-S/14` a random backbone of DINOv2-S/14's size (12 blocks,
384 wide, patch 14) at `--image_size` px, both with tiny.py's NTK-CL settings. Counted: calls of
`train.host_read`, the loop's only device-to-host reads (tests/test_host_sync.py checks there are
no others), per train step. Timed: the train phase of the second task (compiled by then), from
its `start_task` to its `end_task`, which comes after the read at its last step, so every step
has finished; divided by its steps. `log_every_steps=1` approximates the launcher before the
read points: it read `float(loss)` (the non-finite check, blocking) and one `float` per logged
metric, 9 reads, every step. The persistent compilation cache lets runs of one model share the
compiled step. Prints a markdown section.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

from absl import flags
import jax
import ml_collections

from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import train

OLD_READS_PER_STEP = 1 + len(learner_lib.LOG_TERMS)  # float(loss) + the logged scalars


def make_config(model: str, image_size: int, steps: int, batch: int, log_every: int):
  """configs/tiny.py, 2 tasks of 2 classes, `steps` train steps per task."""
  c = config_files.load_config_file("configs/tiny.py")
  if model != "tiny":
    c.model.name, c.model.image_size = model, image_size
    c.model.overrides = ml_collections.ConfigDict()
  c.data.num_classes = 4
  per_class = steps * batch // 2  # 2 classes per task, one epoch of `steps` batches
  c.data.max_per_class_train, c.data.max_per_class_test = per_class, 8
  c.optim.update(epochs=1, batch_size=batch, eval_batch_size=16, lr=0.01)
  c.train.update(mesh_data=1, checkpoint_every_steps=0, keep_checkpoints=1,
                 log_every_steps=log_every)
  return c


def measure(config) -> dict:
  """Runs the launcher; reads per step and seconds per step of task 1's train phase."""
  rec = {"steps": 0, "reads": [], "start": [], "end": []}
  step, read = learner_lib.Learner.train_step, train.host_read
  start, end = learner_lib.Learner.start_task, learner_lib.Learner.end_task

  def counted_step(self, *a, **k):
    rec["steps"] += 1
    return step(self, *a, **k)

  def counted_read(tree):
    rec["reads"].append(rec["steps"])
    return read(tree)

  def timed_start(self, state):
    rec["start"].append((time.perf_counter(), rec["steps"]))
    return start(self, state)

  def timed_end(self, *a, **k):
    rec["end"].append((time.perf_counter(), rec["steps"]))
    return end(self, *a, **k)
  patches = ((learner_lib.Learner, "train_step", counted_step), (train, "host_read", counted_read),
             (learner_lib.Learner, "start_task", timed_start),
             (learner_lib.Learner, "end_task", timed_end))
  saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
  for obj, name, fn in patches:
    setattr(obj, name, fn)
  try:
    # the launcher's log goes to stderr: stdout is the page section
    with tempfile.TemporaryDirectory() as wd, contextlib.redirect_stdout(sys.stderr):
      train.run(config, wd, progress=False)
  finally:
    for obj, name, fn in saved:
      setattr(obj, name, fn)
  (t0, s0), (t1, s1) = rec["start"][1], rec["end"][1]
  n = s1 - s0
  reads = sum(s0 < r <= s1 for r in rec["reads"])
  return {"steps": n, "reads": reads, "s_per_step": (t1 - t0) / n}


def define_flags(fv) -> None:
  flags.DEFINE_string("models", "tiny,DINOv2-S/14", "tiny and/or DINOv2-S/14", flag_values=fv)
  flags.DEFINE_string("log_every", "1,10,50", "train.log_every_steps values", flag_values=fv)
  flags.DEFINE_integer("steps", 100, "train steps per task (tiny)", flag_values=fv)
  flags.DEFINE_integer("big_steps", 50, "train steps per task (DINOv2-S/14)", flag_values=fv)
  flags.DEFINE_integer("image_size", 56, "DINOv2-S/14's image size", flag_values=fv)
  flags.DEFINE_integer("batch", 8, "images per train batch", flag_values=fv)


def _main(fv):
  models = [m for m in fv.models.split(",") if m]
  if set(models) - {"tiny", "DINOv2-S/14"}:
    raise cli.InputError(f"--models={fv.models}: choose from tiny, DINOv2-S/14")
  try:
    every = [int(x) for x in fv.log_every.split(",")]
  except ValueError as e:
    raise cli.InputError(f"--log_every={fv.log_every}: comma-separated integers") from e
  if min(every) < 1 or fv.steps < 1 or fv.big_steps < 1 or fv.batch < 1 or fv.image_size < 14:
    raise cli.InputError("--log_every, --steps, --big_steps, --batch must be >= 1 and "
                         "--image_size >= 14")
  cache = tempfile.TemporaryDirectory()
  jax.config.update("jax_compilation_cache_dir", cache.name)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  rows = []
  for model in models:
    steps = fv.steps if model == "tiny" else fv.big_steps
    size = 16 if model == "tiny" else fv.image_size
    for log_every in every:
      m = measure(make_config(model, fv.image_size, steps, fv.batch, log_every))
      rows.append((f"{model} {size}px", log_every, m))
  cache.cleanup()
  print("## Host syncs of the train loop\n")
  print(f"`python -m benchmarks.host_sync --models={fv.models} --log_every={fv.log_every} "
        f"--steps={fv.steps} --big_steps={fv.big_steps} --image_size={fv.image_size} "
        f"--batch={fv.batch}`: the launcher (`train.run`) on synthetic images, batch {fv.batch}, "
        f"one of {jax.device_count()} device(s), {os.cpu_count()} CPU threads; the second "
        f"task's train phase is timed (load average {os.getloadavg()[0]:.1f} at the end).\n")
  print("| model | log_every_steps | steps timed | device reads / step | s / step | steps / s |")
  print("|---|---:|---:|---:|---:|---:|")
  for model, log_every, m in rows:
    print(f"| {model} | {log_every} | {m['steps']} | {m['reads'] / m['steps']:.2f} | "
          f"{m['s_per_step']:.4f} | {1 / m['s_per_step']:.1f} |")
  print(f"\nBefore the read points the loop read {OLD_READS_PER_STEP} scalars every step "
        "(`float(loss)` for the non-finite check, blocking until the step had run, then each "
        "logged metric); now one `device_get` of the non-finite flag and the metric means at "
        "every `log_every_steps`-th step, each task's last step and each checkpoint save, and "
        "none in between. log_every_steps=1 is the old cadence (one read per step).")
  return rows


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  main()  # exit status 0, or 2 with one error line for bad input (cli.run_program)
