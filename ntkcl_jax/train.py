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
    tb/             TensorBoard event files (the step lines' values, learning rate and pace)
    accuracy_matrix.png, accuracy_per_task.png
    profile/        with `train.profile_steps=A,B`: a jax.profiler trace of train steps A..B
                    (`tensorboard --logdir=WORKDIR/profile`, or its .trace.json.gz in Perfetto)

Before anything is read or built the launcher checks its inputs (config, backbone checkpoint,
data folders or archives, a writable workdir): a wrong path is one `error:` line within seconds.
`optim.batch_size` must divide over the devices; `optim.eval_batch_size` may be any size (eval
batches are padded with masked rows to the mesh). One launcher at a time may use a workdir (process 0 holds WORKDIR/.lock, paths.WorkdirLock; a
second one stops naming the host and pid that hold it). Compiled programs are kept in a
persistent cache (`train.compilation_cache_dir`; by default on GPU and TPU), so a rerun or resume
skips most compiles.

Watching a run: the per-task tqdm bar, and a whole-run progress line (tasks done, steps of all,
elapsed, ETA, images/s) at every task end and, at most every 30 s, at log points. Step lines of
metrics.jsonl carry the learning rate (`lr`) and, unless --noprogress, the pace since the
previous line (`images_per_s` of real images, `steps_per_s`); with --noprogress metrics.jsonl
holds only values that a rerun or resume reproduces byte for byte.

To keep the checkpoint of every task end (e.g. for `python -m ntk_analysis.analyse --task_ends`,
which computes kernels from them), set `--config.train.checkpoint_every_steps=0
--config.train.keep_checkpoints=<number of tasks>`, or a `keep_checkpoints` at least the number of
steps plus tasks to keep every checkpoint.

Multi-host: start one process per host. On a TPU pod (TPU_WORKER_HOSTNAMES of several hosts,
or MEGASCALE_*) or in a SLURM step of several tasks, jax.distributed starts by itself
(sharding.distributed_args); elsewhere pass --coordinator=host:port --num_processes=N
--process_id=i (or NTKCL_COORDINATOR / NTKCL_NUM_PROCESSES / NTKCL_PROCESS_ID; -1 processes: let
JAX discover them). Every process runs this same file; each feeds its own rows of every batch,
and only process 0 writes logs and results.

Exit codes: 2 bad input or environment (one `error:` line), 3 non-finite loss or gradients (the
step is rejected inside the jitted update; the launcher sees it at its next log point or save and
stops, naming the step; the last good checkpoint is kept), 143 pre-empted by SIGTERM (a checkpoint
of the current step is saved).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, Optional, Sequence

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
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit


class NonFiniteStop(cli.Stop):
  """Training stopped on a non-finite loss; the last good checkpoint is kept (exit code 3)."""
  code, label = 3, "error"


class Preempted(cli.Stop):
  """SIGTERM received: a checkpoint of the current step was saved (exit code 143)."""
  code, label = 143, "stopped"


PROGRESS_EVERY_S = 30.0  # the whole-run progress line: at most this often between task ends


def say(text: str) -> None:
  """Prints one of the launcher's lines on process 0 (through tqdm, so an open bar stays
  intact)."""
  if jax.process_index() == 0:
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


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
  prof = tuple(config.train.profile_steps)
  if prof and not (len(prof) == 2 and all(isinstance(x, int) for x in prof)
                   and 1 <= prof[0] <= prof[1]):
    raise cli.InputError(f"train.profile_steps={prof}: give the first and last global train step "
                         "to trace, 1 <= first <= last (e.g. --config.train.profile_steps=11,15), "
                         "or () for none")
  if config.train.reader_threads < 0:
    raise cli.InputError(f"train.reader_threads={config.train.reader_threads}: must be >= 0 (0 = "
                         "one per CPU)")


def check_inputs(config) -> None:
  """Every path the run reads exists (the backbone checkpoint, the data folders or archives),
  checked before any data is listed, read or downloaded: a wrong path is one line in seconds."""
  checkpoints.check_backbone_path(config)
  data.check_paths(config)


def compilation_cache_folder(setting: str, platform: str, given: Optional[str]) -> Optional[str]:
  """The folder of the persistent compilation cache (None: off) for `train.compilation_cache_dir`
  = `setting` on `platform`, where JAX was already `given` one (JAX_COMPILATION_CACHE_DIR):
  a path is that folder, '' is off, 'auto' is the given one, else on accelerators
  $NTKCL_CACHE/jax_compilation or ~/.cache/ntkcl_jax/jax_compilation. 'auto' leaves it off on
  CPU, where compiles are short and XLA logs a false machine-feature error (prefer-no-gather)
  for every cached executable it loads; a path turns it on there too."""
  if setting != "auto":
    return setting or None
  if given:
    return given
  return None if platform == "cpu" else os.path.join(checkpoints.cache_dir(), "jax_compilation")


def use_compilation_cache(setting: str) -> Optional[str]:
  """Points JAX's persistent compilation cache at `compilation_cache_folder` before the first
  compile ('' turns it off); returns the folder, or None when off. Cached programs are the ones
  XLA compiled, so results are unchanged."""
  folder = compilation_cache_folder(setting, jax.default_backend(),
                                    jax.config.jax_compilation_cache_dir)
  if not setting:
    jax.config.update("jax_enable_compilation_cache", False)
  if folder:
    folder = paths.normalize(folder)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
  return folder


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


def policy_line(vcfg) -> str:
  """The compute policy a run uses (after 'auto' is resolved), and for fused attention which
  implementation runs and why (vit.attention_implementation)."""
  line = (f"compute: {vcfg.dtype.name}, matmul precision {vcfg.matmul_precision or 'default'}, "
          f"attention {vcfg.attention}")
  if vcfg.attention == "fused":
    impl, why = vit.attention_implementation(jax.default_backend(), vcfg.dtype, vcfg.head_dim)
    line += f" ({impl}: {why})"
  return line


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Process 0 holds the workdir's lock (paths.WorkdirLock) while the run goes on; a workdir
  another launcher holds stops every process of this one with one line naming the holder."""
  lock, refused = None, None
  if jax.process_index() == 0:
    try:
      lock = paths.WorkdirLock(workdir)
      lock.acquire()
    except cli.InputError as e:
      lock, refused = None, e
  if jax.process_count() > 1:  # the other processes learn whether process 0 got it
    got = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
    if not got and refused is None:
      refused = cli.InputError(f"workdir {workdir} is in use by another launcher (process 0 "
                               "could not lock it); wait for it or choose another --workdir")
  if refused is not None:
    raise refused
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


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


def hms(seconds: float) -> str:
  """Seconds as H:MM:SS."""
  s = int(max(0.0, seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclasses.dataclass
class Pace:
  """How fast the run goes, from the host's clock only (no device reads): images/s and steps/s
  since the previous log point (`rates`, for the step lines and TensorBoard), and the whole-run
  progress line (`line`). Images are the real rows of each batch (a last partial batch's padding
  is not counted), over all hosts. The rates are taken at log points after the loop's device
  read, so the steps they time have finished. The line's ETA and images/s follow the pace since
  the first log point (compiling the step is not training), including evaluations."""
  total_steps: int  # train steps of the whole run
  num_tasks: int
  log_every: int  # the line is due at most every log_every-th log point
  steps_before: int = 0  # done before this process started (a resumed run)
  tasks_before: int = 0
  wall_before: float = 0.0
  clock: Callable[[], float] = time.perf_counter

  def __post_init__(self):
    """Starts the clocks: now is the start of this process's part of the run."""
    self.t0 = self.mark = self.last_line = self.clock()
    self.images = self.steps = 0  # since this process started
    self.window_images = self.window_steps = 0  # since `mark`
    self.logs_since_line = 0
    self.first = None  # (time, images, steps) at the first log point

  def step(self, images: int) -> None:
    """Counts one dispatched train step of `images` real images."""
    self.images += images
    self.steps += 1
    self.window_images += images
    self.window_steps += 1

  def restart(self) -> None:
    """A new window from now (a task's training starts; its evaluation is not timed)."""
    self.mark, self.window_images, self.window_steps = self.clock(), 0, 0

  def rates(self) -> dict:
    """{'images_per_s', 'steps_per_s'} since the window started; a new window starts."""
    now = self.clock()
    dt = max(now - self.mark, 1e-9)
    out = {"images_per_s": self.window_images / dt, "steps_per_s": self.window_steps / dt}
    self.mark, self.window_images, self.window_steps = now, 0, 0
    if self.first is None:
      self.first = (now, self.images, self.steps)
    return out

  def line(self, tasks_done: int, step: int, task_end: bool = False) -> Optional[str]:
    """The progress line: always at a task end; at a log point only when PROGRESS_EVERY_S
    seconds and log_every log points have passed since the last one (else None)."""
    now = self.clock()
    if not task_end:
      self.logs_since_line += 1
      if now - self.last_line < PROGRESS_EVERY_S or self.logs_since_line < self.log_every:
        return None
    self.last_line, self.logs_since_line = now, 0
    t1, images1, steps1 = self.first or (self.t0, 0, 0)
    if self.total_steps > self.steps_before:  # by steps; evaluation time is in their pace
      left, pace = self.total_steps - step, (self.steps - steps1) / max(now - t1, 1e-9)
    else:  # no training (simplecil): by tasks
      t1 = self.t0
      left = self.num_tasks - tasks_done
      pace = (tasks_done - self.tasks_before) / max(now - t1, 1e-9)
    eta = hms(left / pace) if pace > 0 else ("0:00:00" if left <= 0 else "?")
    images = (self.images - images1) / max(now - t1, 1e-9)
    return (f"progress: {tasks_done}/{self.num_tasks} tasks done, step {step}/"
            f"{self.total_steps}, elapsed {hms(self.wall_before + now - self.t0)}, ETA {eta}, "
            f"{images:.1f} images/s")


def trace_options() -> jax.profiler.ProfileOptions:
  """The profiler's collectors: XLA and host activity (device ops, compiles, transfers), without
  the Python function tracer. That tracer swaps into every other Python thread's state to set and
  clear its hooks while those threads run (TensorBoard's writer, checkpoint and reader threads),
  and it crashed the process with a segfault inside stop_trace once in our test runs."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


@dataclasses.dataclass
class StepTrace:
  """A jax.profiler trace of global train steps first..last (`train.profile_steps`, process 0)
  into WORKDIR/profile: started before step `first` is dispatched, stopped once step `last` has
  finished (or when the loop ends). An object-store workdir gets the trace when it stops."""
  workdir: str
  steps: tuple = ()  # (first, last), () = off
  local: Optional[str] = None  # the folder being traced into while active

  def before(self, step: int) -> None:
    """Starts the trace when `step`, about to be dispatched, is in the range."""
    if self.steps and self.local is None and self.steps[0] <= step <= self.steps[1]:
      target = paths.join(self.workdir, "profile")
      self.local = (tempfile.mkdtemp(prefix="ntkcl_profile_") if paths.is_remote(target)
                    else target)
      jax.profiler.start_trace(self.local, create_perfetto_trace=True,
                               profiler_options=trace_options())

  def after(self, step: int, state) -> None:
    """Stops the trace once `step`, just dispatched, is the last one traced."""
    if self.local is not None and step >= self.steps[1]:
      self.stop(state)

  def stop(self, state=None) -> None:
    """Waits for `state` (the last traced step's result), ends the trace and, for an object
    store, uploads it."""
    if self.local is None:
      return
    local, self.local = self.local, None
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    target = paths.join(self.workdir, "profile")
    if local != target:
      paths.upload_tree(local, target)
      shutil.rmtree(local, ignore_errors=True)
    say(f"profile of train steps {self.steps[0]}-{self.steps[1]}: {target} "
        f"(tensorboard --logdir={target})")


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) one continual-learning run in `workdir`; returns the results dict.

  First the inputs, before anything is read or built: the config, the paths it reads (backbone
  checkpoint, data folders or archives) and the workdir; then, holding the workdir's lock, the
  run itself (`train_and_evaluate`). `progress`: tqdm bars and the pace in metrics.jsonl."""
  config = ntkcl.resolve_policy(config)  # 'auto' compute policy -> this platform's, as saved
  validate_config(config)
  cache = use_compilation_cache(config.train.compilation_cache_dir)  # before the first compile
  check_inputs(config)
  workdir = paths.normalize(workdir)  # local: absolute; gs://...: kept as given
  prepare_workdir(workdir)
  with workdir_lock(workdir):
    return train_and_evaluate(config, workdir, progress=progress, cache=cache)


def train_and_evaluate(config, workdir: str, *, progress: bool = True,
                       cache: Optional[str] = None) -> dict:
  """The run of `run` once its inputs are checked: mesh -> data stream -> learner state (new or
  restored) -> task loop -> oracle-prototype pass -> results. `cache`: the compilation cache
  folder in use (printed)."""
  t_start = time.time()
  is_main = jax.process_index() == 0
  bsz, ebsz = config.optim.batch_size, config.optim.eval_batch_size

  # Mesh ---------------------------------------------------------------------------------------
  mesh = make_mesh(config)
  sharding.check_batch_divisible(bsz, mesh)
  say(f"mesh {dict(mesh.shape)} over {mesh.devices.size} of {jax.device_count()} devices "
      f"({jax.process_count()} processes); workdir {workdir}; compilation cache "
      f"{cache or 'off'}")

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
  say(policy_line(learner.vcfg))
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
  pace = Pace(total_steps=sum(epochs * stream.num_train_batches(t, bsz) for t in range(num_run)),
              num_tasks=num_run, log_every=log_every, steps_before=step,
              tasks_before=len(records), wall_before=wall_before)
  trace = StepTrace(workdir, tuple(config.train.profile_steps) if is_main else ())
  bar = None
  try:
    for t in range(pos.task, num_run):
      classes = stream.tasks[t]
      learner.check_task(t, classes)
      if pos.phase == "train":
        if pos.epoch == 0 and pos.batch == 0:
          state = learner.start_task(state)
        nb, n_images = stream.num_train_batches(t, bsz), stream.num_train_images(t)
        pace.restart()  # the pace of training, not of the evaluation before it
        for e in range(pos.epoch, epochs):
          first = pos.batch if e == pos.epoch else 0
          lr = learner_lib.cosine_lr(config.optim.lr, e, config.optim.epochs)  # this epoch's
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
            trace.before(loop.step)
            # asynchronous: the state is donated, and nothing is read back here
            state, means = learner.train_step(state, batch, e, classes, log=log_now)
            trace.after(loop.step, state)
            pace.step(min(bsz, n_images - b * bsz))  # real rows, not the padding
            loop.where[loop.step] = (t, e, b)
            if bar is not None:
              bar.update(1)
            if log_now:
              scalars = loop.check(state, means)
              rates = pace.rates()  # after the read: the steps timed have finished
              if bar is not None:
                bar.set_postfix({k: f"{scalars[k]:.3f}" for k in ("loss", "accuracy")},
                                refresh=False)
              writer.write({"event": "step", "step": loop.step, "task": t, "epoch": e,
                            **scalars, "lr": lr, **(rates if progress else {})})
              writer.scalars(loop.step, {**scalars, "lr": lr, **rates}, "train")
              line = pace.line(len(loop.records), loop.step)
              if line:
                say(line)
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
      say(pace.line(len(loop.records), loop.step, task_end=True))
      pos = Position(t + 1)
      loop.save(state, pos)
      loop.stop_if_preempted(state, pos)
  finally:
    trace.stop()
    if bar is not None:
      bar.close()
    writer.close()
    if handler is not None:
      signal.signal(signal.SIGTERM, handler)
    # waits for a save in flight, on every way out: none is left to finish during the
    # interpreter's shutdown, when orbax can no longer commit it
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
  flags.DEFINE_integer("num_processes", 1, "number of processes (-1: let JAX discover them; "
                       "TPU pods and SLURM steps of several tasks are found without it)")
  flags.DEFINE_integer("process_id", 0, "this process's index")
  flags.DEFINE_bool("progress", True, "tqdm progress bars, and the pace (images/s, steps/s) in "
                    "metrics.jsonl step lines; off, metrics.jsonl holds only what a rerun "
                    "reproduces (the whole-run progress line is printed either way)")


def _main(argv: Sequence[str], config, spec: str) -> None:
  """Starts jax.distributed and runs; each known failure is one line with its exit code:
  2 bad input or environment, 3 non-finite loss, 143 pre-empted."""
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    how = sharding.initialize_distributed(f.coordinator, f.num_processes, f.process_id)
    if how:
      say(f"jax.distributed: {jax.process_count()} processes, {how}")
    if f.workdir.startswith("-"):  # `--workdir --next_flag` takes the next flag as its value
      raise cli.InputError(f"--workdir={f.workdir!r} looks like a flag, not a directory; give "
                           "--workdir=DIR")
    run(config, f.workdir or default_workdir(spec, config.seed), progress=f.progress)
  except cli.INPUT_ERRORS as e:
    cli.fail(e, prog="")
  except cli.Stop as e:
    cli.fail(e, prog="", code=e.code, label=e.label)
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
