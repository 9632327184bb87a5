r"""The training launcher: config -> mesh -> data stream -> learner state -> task loop -> results.

    python -m ntkcl_jax.train                                  # the demo (configs/demo.py)
    python -m ntkcl_jax.train \
        --config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k,ckpt=/path/B_16.npz \
        --workdir=workdirs/c100 --config.seed=1 --config.optim.epochs=5

`--config` is an ml_collections config file (big_vision style: `get_config(arg)`); any field can be
overridden with `--config.key=value`, and an unknown key stops the launcher with the list of valid
keys. `--workdir` (default `workdirs/<config>-seed<seed>`; a local folder or a URI such as
`gs://bucket/run`, ntkcl_jax/paths.py) receives everything:

    checkpoints/    orbax training state, every `train.checkpoint_every_steps` steps and at every
                    task end (the newest `train.keep_checkpoints` are kept); rerunning the same
                    command resumes from the newest complete one
    results.json    accuracy matrix, Ā, A_T, forgetting, BWT, top-k, old/new, class order, config
    metrics.jsonl   one JSON object per logged step / task end (read back with pandas.read_json);
                    a step line holds the means of the loss terms and accuracy over the steps
                    since the previous line (every `train.log_every_steps`, step 1, each task's
                    last step)
    tb/             TensorBoard event files
    accuracy_matrix.png, accuracy_per_task.png

To keep the checkpoint of every task end (e.g. for `python -m ntk_analysis.analyse --task_ends`,
which computes kernels from them), set `--config.train.checkpoint_every_steps=0
--config.train.keep_checkpoints=<number of tasks>`, or a `keep_checkpoints` at least the number of
steps plus tasks to keep every checkpoint.

Multi-host: start one process per host with --coordinator=host:port --num_processes=N
--process_id=i (or NTKCL_COORDINATOR / NTKCL_NUM_PROCESSES / NTKCL_PROCESS_ID; -1 processes on
TPU pods). Every process runs this same file; each feeds its own rows of every batch, and only
process 0 writes logs and results.

Exit codes: 2 bad input or environment (one `error:` line), 3 non-finite loss or gradients (the
step is rejected inside the jitted update; the launcher sees it at its next log point or save and
stops, naming the step; the last good checkpoint is kept), 143 pre-empted by SIGTERM (a checkpoint
of the current step is saved).
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from absl import app, flags, logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from ntkcl_jax import checkpoints
from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import data
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import metric_writer
from ntkcl_jax import paths
from ntkcl_jax import plots
from ntkcl_jax import results
from ntkcl_jax import same_run
from ntkcl_jax import sharding
from ntkcl_jax.checkpoints import run_state
from ntkcl_jax.data import stream as stream_lib


class NonFiniteStop(RuntimeError):
  """Training stopped on a non-finite loss; the last good checkpoint is kept (exit code 3)."""


class Preempted(RuntimeError):
  """SIGTERM received: a checkpoint of the current step was saved (exit code 143)."""


def host_read(tree):
  """Device -> host: the train loop's only reads, at its read points (see `run`); a blocking
  transfer of a few scalars (tests/test_host_sync.py counts them)."""
  return jax.device_get(tree)


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run goes on from: the next train batch of (task, epoch), or, with phase 'eval', the
  end of the task (EMA, prototypes, evaluation). Saved with every checkpoint."""
  task: int = 0
  epoch: int = 0
  batch: int = 0
  phase: str = "train"


def after_step(task: int, epoch: int, batch: int, num_batches: int, epochs: int) -> Position:
  """What comes after train batch `batch` of (task, epoch): the next batch, the next epoch's
  first batch, or the end of the task."""
  if batch + 1 < num_batches:
    return Position(task, epoch, batch + 1)
  if epoch + 1 < epochs:
    return Position(task, epoch + 1, 0)
  return Position(task, epochs, 0, "eval")


def validate_config(config) -> None:
  """Checks a config for impossible settings before anything expensive is built."""
  d, o = config.data, config.optim
  if d.num_classes <= 0 or d.init_cls <= 0 or d.increment <= 0:
    raise cli.InputError(f"impossible split: num_classes={d.num_classes}, init_cls={d.init_cls}, "
                         f"increment={d.increment}; all must be positive")
  if d.init_cls > d.num_classes:
    raise cli.InputError(f"impossible split: init_cls={d.init_cls} is more than the "
                         f"{d.num_classes} classes of {d.name} (data.num_classes)")
  if o.epochs <= 0 or o.batch_size <= 0:
    raise cli.InputError(f"optim.epochs={o.epochs} and optim.batch_size={o.batch_size} must be "
                         "> 0")
  if d.tasks_to_run < 0:
    raise cli.InputError(f"data.tasks_to_run={d.tasks_to_run}: must be >= 0 (0 = every task)")
  if config.train.checkpoint_every_steps < 0:
    raise cli.InputError("train.checkpoint_every_steps must be >= 0 (0 = only at task ends)")


def make_mesh(config):
  """The data-parallel mesh of `train.mesh_data` devices (-1: every device of every process).

  A smaller mesh on a single process uses the first devices only (e.g. train.mesh_data=1 runs on
  one device of a multi-device machine). A config that still sets the removed
  `train.mesh_model` stops here with one line saying what to do.
  """
  config_files.check_removed_keys(config)
  n = config.train.mesh_data
  devices = jax.devices()
  if 0 < n < len(devices) and jax.process_count() == 1:
    devices = devices[:n]
  return sharding.make_mesh(n, devices=devices)


def prepare_workdir(workdir: paths.PathLike, min_free_bytes: int = 0) -> None:
  """Creates the workdir and proves it is writable (a probe file written and removed), before
  training; on a local disk also that it has `min_free_bytes` free (object stores have no such
  limit to ask). Works on any path ntkcl_jax.paths accepts, `gs://` included."""
  workdir = paths.normalize(workdir)
  try:
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise cli.InputError(f"workdir {workdir!r} is not writable ({e.strerror or e}); choose "
                         f"another --workdir") from e
  if paths.is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    raise cli.InputError(f"only {free / 2**20:.0f} MiB free under {workdir!r}, but checkpoints "
                         f"of this run need about {min_free_bytes / 2**20:.0f} MiB; free space or "
                         f"choose another --workdir")


def check_same_run(meta: dict, config, class_order: list, workdir: str) -> None:
  """A workdir resumes only the run it holds (ntkcl_jax/same_run.py: the rule the drivers reuse
  finished runs by) with the same class order; the refusal names each differing key."""
  diffs = same_run.differences(meta["config"], config)
  if diffs or meta["class_order"] != class_order:
    what = (same_run.describe(diffs) if diffs else
            f"class order: saved {meta['class_order']}, asked {class_order}")
    raise cli.InputError(
        f"{workdir} holds another run ({what}); resume it with its own config "
        f"({workdir}/checkpoints holds it) or use a new --workdir")


@dataclasses.dataclass
class Loop:
  """What the task loop of `run` carries between steps (counters, the task records so far, what
  was saved and checked) and the three things it does between steps: save a checkpoint, read the
  device's non-finite flag, stop on SIGTERM.

  Reads: the loop reads nothing back from the device except at its read points: every
  `train.log_every_steps` steps (and step 1), the last step of each task, and before every
  checkpoint save. There it learns whether the learner held back a non-finite step (the state
  then is the last good one, and nothing after it is saved) and, at log points, the metrics.
  Checkpoint ids count events: one per train step and one per task end."""
  learner: learner_lib.Learner
  ckpt: run_state.RunCheckpointer
  writer: metric_writer.MetricWriter
  workdir: str
  run_meta: dict  # config, class order and number of tasks, saved with every checkpoint
  step: int  # train steps so far
  records: list  # one per finished task
  wall_before: float  # seconds of the run before this process resumed it
  t_start: float
  event: int = -1  # checkpoint id of the current position (set from step and records)
  saved: Optional[int] = None  # event of the last save
  checked: int = -1  # the state is known to be finite up to this step
  where: dict = dataclasses.field(default_factory=dict)  # (task, epoch, batch) since a read
  sigterm: threading.Event = dataclasses.field(default_factory=threading.Event)

  def __post_init__(self):
    self.event = self.step + len(self.records)
    self.checked = self.step

  def save(self, state, position: Position) -> None:
    self.ckpt.save(self.event, state, results.jsonable({
        **self.run_meta, "position": dataclasses.asdict(position),
        "counters": {"event": self.event, "global_step": self.step},
        "task_records": self.records, "metrics_bytes": self.writer.nbytes(),
        "wall_time_s": self.wall_before + time.time() - self.t_start}))
    self.saved = self.event

  def check(self, state, means=None):
    """One device-to-host read of the state's non-finite flag (and `means`): stops on a held
    step, else returns the means as floats."""
    if means is None and self.checked == self.step:
      return None
    got = host_read({"status": self.learner.status(state), "means": means})
    bad = int(got["status"]["nonfinite_step"])
    if bad:
      self.ckpt.wait()
      t_, e_, b_ = self.where.get(bad, ("?", "?", "?"))
      last = self.ckpt.latest_id()
      kept = (f"the last good checkpoint is {self.workdir}/checkpoints/{last}" if last is not None
              else "no checkpoint was saved before it")
      raise NonFiniteStop(
          f"stopped: non-finite loss {float(got['status']['nonfinite_loss'])} (or gradients) in "
          f"task {t_} epoch {e_} step {b_}, at global step {bad} (seen at step {self.step}, the "
          f"first read after it; train.log_every_steps sets how often). The bad update was not "
          f"applied and nothing after it was saved; {kept}. Lower optim.lr or check the data, "
          f"then rerun (with a new --workdir, or the same one to resume from that checkpoint).")
    self.where.clear()
    self.checked = self.step
    return None if means is None else {k: float(v) for k, v in got["means"].items()}

  def stop_if_preempted(self, state, position: Position) -> None:
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(self.event):
      self.sigterm.set()
    if self.sigterm.is_set():
      if self.saved != self.event:
        self.check(state)
        self.save(state, position)
      self.ckpt.wait()
      raise Preempted(f"SIGTERM: saved checkpoint {self.event} at "
                      f"{dataclasses.asdict(position)}; rerun the same command to resume")


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) one continual-learning run in `workdir`; returns the results dict."""
  t_start = time.time()
  is_main = jax.process_index() == 0

  def say(text: str) -> None:
    if is_main:
      print(text, flush=True)

  # Config and workdir -------------------------------------------------------------------------
  validate_config(config)
  workdir = paths.normalize(workdir)  # local: absolute; gs://...: kept as given
  prepare_workdir(workdir)
  bsz, ebsz = config.optim.batch_size, config.optim.eval_batch_size

  # Mesh ---------------------------------------------------------------------------------------
  mesh = make_mesh(config)
  sharding.check_batch_divisible(bsz, mesh)
  say(f"mesh {dict(mesh.shape)} over {mesh.devices.size} of {jax.device_count()} devices "
      f"({jax.process_count()} processes); workdir {workdir}")

  # Data stream --------------------------------------------------------------------------------
  stream = data.build_stream(config, jax.process_index(), jax.process_count())
  class_order = [int(c) for c in np.asarray(stream.class_order).reshape(-1)]
  task_classes = [[class_order[int(c)] for c in np.asarray(t).reshape(-1)] for t in stream.tasks]
  num_run = stream.num_tasks if config.data.tasks_to_run == 0 else config.data.tasks_to_run
  if num_run > stream.num_tasks:
    raise cli.InputError(f"data.tasks_to_run={num_run}, but the protocol has only "
                         f"{stream.num_tasks} tasks; use at most {stream.num_tasks} (0 = all)")
  say(f"data: {config.data.name} ({stream.description}); {stream.num_tasks} tasks"
      f"{f' (the first {num_run} run)' if num_run < stream.num_tasks else ''}, class order "
      f"{class_order}")

  # Learner state ------------------------------------------------------------------------------
  learner = learner_lib.Learner(config, checkpoints.build_backbone(config), mesh)
  epochs = learner.epochs()
  key = jax.random.PRNGKey(config.seed)
  abstract = learner.abstract_state(key)
  num_events = sum(epochs * stream.num_train_batches(t, bsz) + 1 for t in range(num_run))
  prepare_workdir(workdir, min_free_bytes=(min(config.train.keep_checkpoints, num_events) + 1)
                  * run_state.state_nbytes(abstract))
  ckpt = run_state.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                   keep=config.train.keep_checkpoints)
  cfg_json = json.loads(config.to_json_best_effort())

  # Restore ------------------------------------------------------------------------------------
  restored = ckpt.latest(abstract)
  if restored is None:
    state, pos, step, records, wall_before = learner.init_state(key), Position(), 0, [], 0.0
  else:
    state, meta = restored
    check_same_run(meta, config, class_order, workdir)
    pos = Position(**meta["position"])
    step = int(meta["counters"]["global_step"])
    records = list(meta["task_records"])
    wall_before = float(meta["wall_time_s"])
  writer = metric_writer.MetricWriter(workdir, active=is_main, resume_step=step)
  if restored is None:
    writer.truncate(0)  # lines of a run killed before its first checkpoint
    writer.write({"event": "run_start", "config": cfg_json, "class_order": class_order,
                  "versions": results.versions(), "devices": jax.device_count(),
                  "processes": jax.process_count()})
  else:
    writer.truncate(meta["metrics_bytes"])  # what was logged after the checkpoint is redone
    logging.info("resuming from checkpoint %d: position %s, step %d", ckpt.latest_id(), pos, step)
    say(f"resuming {workdir} at {dataclasses.asdict(pos)} (step {step})")
  loop = Loop(learner, ckpt, writer, workdir, {"config": cfg_json, "class_order": class_order,
                                               "num_tasks": stream.num_tasks},
              step=step, records=records, wall_before=wall_before, t_start=t_start)
  # Pre-emption: one process hears SIGTERM itself; several agree on a step through JAX's
  # distributed runtime, which hears the notice on any host.
  handler = None
  if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
    handler = signal.signal(signal.SIGTERM, lambda *_: loop.sigterm.set())

  # Train --------------------------------------------------------------------------------------
  log_every, every = max(1, config.train.log_every_steps), config.train.checkpoint_every_steps
  bar = None
  try:
    for t in range(pos.task, num_run):
      classes = stream.tasks[t]
      learner.check_task(t, classes)
      if pos.phase == "train":
        if pos.epoch == 0 and pos.batch == 0:
          state = learner.start_task(state)
        nb = stream.num_train_batches(t, bsz)
        for e in range(pos.epoch, epochs):
          first = pos.batch if e == pos.epoch else 0
          if is_main and progress:
            bar = tqdm(total=nb, initial=first, mininterval=1.0, leave=False, dynamic_ncols=True,
                       desc=f"task {t + 1}/{num_run} epoch {e + 1}/{epochs}")
          # uint8 batches, each put on the devices while the step before it runs
          batches = stream_lib.prefetch_to_device(
              stream.train_batches(t, e, bsz, start_batch=first), learner.device_batch)
          for b, batch in enumerate(batches, first):
            loop.step, loop.event = loop.step + 1, loop.event + 1
            position = after_step(t, e, b, nb, epochs)
            log_now = loop.step % log_every == 0 or loop.step == 1 or position.phase == "eval"
            # asynchronous: the state is donated, and nothing is read back here
            state, means = learner.train_step(state, batch, e, classes, log=log_now)
            loop.where[loop.step] = (t, e, b)
            if bar is not None:
              bar.update(1)
            if log_now:
              scalars = loop.check(state, means)
              if bar is not None:
                bar.set_postfix({k: f"{scalars[k]:.3f}" for k in ("loss", "accuracy")},
                                refresh=False)
              writer.write({"event": "step", "step": loop.step, "task": t, "epoch": e, **scalars})
              writer.scalars(loop.step, scalars, "train")
            if every and loop.step % every == 0:
              loop.check(state)
              loop.save(state, position)
            loop.stop_if_preempted(state, position)
          if bar is not None:
            bar.close()
            bar = None

      # End of task t: EMA, prototypes, evaluation on every class seen so far.
      state = learner.end_task(state, t, stream.eval_batches("proto", classes, ebsz))
      seen = [c for s in range(t + 1) for c in stream.tasks[s]]
      result = learner.evaluate(state, t, stream.eval_batches("test", seen, ebsz), stream.tasks)
      state = learner.finish_task(state, t, result["per_task_accuracy"])
      loop.event += 1
      rec = results.task_record(result, t)
      loop.records.append(rec)
      writer.write({"event": "task_end", "step": loop.step, **rec})
      writer.scalars(loop.step, {"top1_all_seen": rec["top1"]}, "eval")
      if rec["topk"] is not None:
        writer.scalars(loop.step, {"topk_all_seen": rec["topk"]}, "eval")
      writer.scalars(loop.step, {f"task_{s}": v for s, v in enumerate(rec["per_task"])}, "eval")
      writer.flush()
      say(f"task {t + 1}/{num_run}: accuracy on all seen classes {rec['top1']:.2f}%, "
          f"per task {[round(v, 2) for v in rec['per_task']]}")
      pos = Position(t + 1)
      loop.save(state, pos)
      loop.stop_if_preempted(state, pos)
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    if handler is not None:
      signal.signal(signal.SIGTERM, handler)
  ckpt.wait()
  ckpt.close()

  # Oracle-prototype diagnostic: the final state with every seen class's prototype recomputed
  # from its training images (forward passes only); against the last row it shows how much of
  # the forgetting is stale prototypes and how much is the features.
  seen = [c for s in range(num_run) for c in stream.tasks[s]]
  oracle_state = learner.prototypes_from(state, stream.eval_batches("proto", seen, ebsz),
                                         "oracle prototypes")
  oracle = results.task_record(learner.evaluate(
      oracle_state, num_run - 1, stream.eval_batches("test", seen, ebsz), stream.tasks),
      num_run - 1)

  # Results ------------------------------------------------------------------------------------
  wall = wall_before + time.time() - t_start
  out = results.build(loop.records, num_run, class_order, config, wall, topk=config.topk,
                      tasks_classes=task_classes[:num_run], oracle=oracle)
  if is_main:
    results.atomic_write_json(os.path.join(workdir, "results.json"), out)
    title = f"{config.data.name} {config.method.name} seed {config.seed}"
    r = np.array(out["accuracy_matrix"], dtype=np.float64)  # None -> nan
    plots.accuracy_matrix_heatmap(r, os.path.join(workdir, "accuracy_matrix.png"), title)
    plots.accuracy_per_task(r, os.path.join(workdir, "accuracy_per_task.png"),
                            out["accuracy_per_step"], title)
    say(f"\naccuracy matrix (%), row t = after task t, column s = test classes of task s:\n"
        f"{results.format_matrix(r)}\n"
        f"average incremental accuracy {out['avg_incremental_accuracy']:.2f}%   "
        f"last accuracy {out['last_accuracy']:.2f}%   forgetting "
        f"{results.fmt(out['forgetting'])}   wall time {wall:.0f} s\n"
        f"results: {os.path.join(workdir, 'results.json')}")
  return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def default_workdir(config_spec: str, seed: int) -> str:
  path, _, arg = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "-" + "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in arg)
  return os.path.join("workdirs", f"{name}-seed{seed}")


def _define_flags() -> None:
  flags.DEFINE_string("workdir", "", "output / resume directory (default workdirs/<config>-"
                      "seed<seed>)")
  flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process runs)")
  flags.DEFINE_integer("num_processes", 1, "number of processes (-1: discover, TPU pods)")
  flags.DEFINE_integer("process_id", 0, "this process's index")
  flags.DEFINE_bool("progress", True, "tqdm progress bars")


def _main(argv: Sequence[str], config, spec: str) -> None:
  """Starts jax.distributed and runs; each known failure is one line with its exit code:
  2 bad input or environment, 3 non-finite loss, 143 pre-empted."""
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    sharding.initialize_distributed(f.coordinator, f.num_processes, f.process_id)
    if f.workdir.startswith("-"):  # `--workdir --next_flag` takes the next flag as its value
      raise cli.InputError(f"--workdir={f.workdir!r} looks like a flag, not a directory; give "
                           "--workdir=DIR")
    run(config, f.workdir or default_workdir(spec, config.seed), progress=f.progress)
  except cli.INPUT_ERRORS as e:
    cli.fail(e, prog="")
  except NonFiniteStop as e:
    cli.fail(e, prog="", code=3)
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(143)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS):
      raise
    cli.fail(e, prog="")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point: `--config=PATH[:arg]` (default the demo) and its `--config.KEY=VALUE`
  overrides are loaded first (ntkcl_jax.config_files); a bad file, key or value stops with one
  `error:` line (exit 2)."""
  try:
    config, spec, rest = config_files.from_argv(sys.argv if argv is None else argv)
  except cli.INPUT_ERRORS as e:
    cli.fail(e, prog="")
  _define_flags()
  app.run(functools.partial(_main, config=config, spec=spec), argv=rest,
          flags_parser=lambda a: cli.parse_flags(a, prog=""))


if __name__ == "__main__":
  main()
