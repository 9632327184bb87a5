r"""Empirical NTKs of a training run's saved checkpoints:

    python -m ntk_analysis.analyse --workdir=DIR                # the newest checkpoint
    python -m ntk_analysis.analyse --workdir=DIR --task_ends    # every task-end checkpoint

Draws fixed, seeded subsets of each task's training images (test transform) and computes one
joint kernel per view over the trainable PEFT parameters (frozen backbone closed over), with a
feature-sketch readout (readouts.model_readout). The 'all' view (three views stacked) is the mean
of the three views' kernels, so it reuses them. Jacobian panels follow the memory budget
(--memory_limit_gb; default: half the available memory, at most kernel_memory.DEFAULT_MEMORY_CAP)
unless --chunk is given; the estimate (per device: the Jacobian call's arguments, activations and
output; on the host: panels, kernel and call scratch) is printed. The Jacobian calls spread their
samples over every device (--devices; several processes: --coordinator, --num_processes and
--process_id as for training, each process computes the same kernels and process 0 writes them).
Only the drawn subsets of the images are decoded (task_data). Writes DIR/ntk/: kernel_<view>.npz (kernel + metadata), report.json
(metrics per task and task pair, experiments (a) and (c)), and PNG plots. --task_ends writes the
kernels of each task end to DIR/ntk/task<t>/ (joint.task_end_path), which the experiments read;
the run must have kept those checkpoints (train.keep_checkpoints at least the number of tasks with
train.checkpoint_every_steps=0, or at least steps plus tasks).
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterator, Optional, Sequence

from absl import app, flags, logging
import numpy as np

import jax

from ntk_analysis import experiments, joint, kernels, metrics, plots, readouts
from ntkcl_jax import cli, data, sharding
from ntkcl_jax import results as results_lib
from ntkcl_jax.checkpoints import run_state, runs

FLAGS = flags.FLAGS


class TaskImages:
  """One task's training images under the test transform, decoded only when indexed: images[idx]
  -> the model's normalised float32 input of those images (an index array, slice or int), in the
  order of stream.eval_batches('proto', the task's classes); len() needs no decoding."""

  def __init__(self, stream, classes):
    rows, new = stream.train_idx, stream.train_new
    self.stream, self.rows = stream, rows[np.isin(new[rows], list(classes))]
    self.labels = new[self.rows].astype(np.int32)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, idx) -> np.ndarray:
    rows = np.atleast_1d(self.rows[idx])
    # pylint: disable-next=protected-access  # the stream's cached test-transform decode
    images = np.stack([self.stream._eval_image("proto", int(i)) for i in rows])
    out = self.stream.model_input(images)
    return out if np.ndim(self.rows[idx]) else out[0]

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[np.arange(len(self))]
    return out if dtype is None else out.astype(dtype)


def task_data(stream):
  """({task: TaskImages, the training images under the test transform as the model's normalised
  float32 input}, {task: their labels}) of every task. Nothing is decoded until indexed: the
  kernels draw their subsets first and decode those images only."""
  images = {t: TaskImages(stream, classes) for t, classes in enumerate(stream.tasks)}
  return images, {t: im.labels for t, im in images.items()}


def view_kernels(learner, state, images, views: Sequence[str], *, n_per_task: int,
                 num_probes: int, seed: int = 0, checkpoint="", log=print,
                 **ntk_kwargs) -> dict:
  """{view: JointKernel} of one learner state; 'all' is the mean of the three views' kernels.
  `ntk_kwargs` configure kernels.ntk_fn (devices, chunk, memory_limit, ...); `log` also receives
  each kernel's memory estimate."""
  probe = readouts.probes(learner.spec.feature_dim, num_probes, seed)
  single = {}

  def one_view(view):
    if view not in single:
      f, params = readouts.model_readout(learner, state, view, probe)
      t, prof = time.time(), {}
      kernel_fn = kernels.ntk_fn(f, profile=prof, log=lambda s: log(f"  view {view}: {s}"),
                                 **ntk_kwargs)
      jk = joint.compute(f, params, images, n=n_per_task, seed=seed, checkpoint=str(checkpoint),
                         readout=f"feature_sketch/{view}", probe_seed=seed,
                         groups=sorted(params), kernel_fn=kernel_fn, **ntk_kwargs)
      jk.meta.update(view=view, seconds=time.time() - t, sketch_outputs=num_probes,
                     profile={k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in prof.items()})
      single[view] = jk
    return single[view]

  out = {}
  for view in views:
    t = time.time()
    if view == "all":
      # the stacked readout's traced kernel is the mean over its 3R outputs, i.e. the mean of
      # the three views' kernels (same parameters, images and probes)
      parts = [one_view(v) for v in readouts.VIEWS]
      jk = joint.JointKernel(k=sum(p.k for p in parts) / len(parts),
                             task_index=parts[0].task_index, indices=parts[0].indices,
                             meta=dict(parts[0].meta))
      jk.meta.update(view="all", readout="feature_sketch/all", sketch_outputs=3 * num_probes,
                     seconds=time.time() - t, profile={"mean_of_views": list(readouts.VIEWS)})
    else:
      jk = one_view(view)
    log(f"  view {view}: {jk.k.shape[0]}x{jk.k.shape[1]} kernel over {jk.meta['P']:,} "
        f"parameters in {jk.meta['seconds']:.1f} s")
    out[view] = jk
  return out


def analyse(workdir: str, n_per_task: int = 16, num_probes: int = 8, views=("fused",),
            checkpoint: Optional[int] = None, seed: int = 0, out_dir: Optional[str] = None,
            log=print, plot: bool = True, devices=None, **ntk_kwargs) -> dict:
  """Computes and writes the kernels, report and plots of one checkpoint (None: the newest) of a
  run; returns the report. `devices`: those the Jacobian calls split their samples over
  (kernels.device_mesh: None one device, 'all' every device of every process, the CLI's
  default); with devices of several processes only process 0 writes. `ntk_kwargs` configure
  kernels.ntk_fn (chunk, memory_limit, backend, implementation, ...)."""
  out_dir = out_dir or os.path.join(workdir, "ntk")
  spans = {d.process_index for d in kernels.device_mesh(devices).devices.reshape(-1)}
  write = jax.process_index() == 0 or spans == {jax.process_index()}
  if write:
    os.makedirs(out_dir, exist_ok=True)
  config, learner, state, meta = runs.load_run(workdir, checkpoint)
  stream = data.build_stream(config)
  images, labels = task_data(stream)
  log(f"{workdir}: checkpoint {meta['checkpoint_id']}, {stream.num_tasks} tasks x "
      f"{n_per_task} images, method {config.method.name}/{config.method.variant}")
  report = {"workdir": os.path.abspath(workdir), "checkpoint_id": meta["checkpoint_id"],
            "method": config.method.name, "variant": config.method.variant,
            "n_per_task": n_per_task, "probes": num_probes,
            "backend": ntk_kwargs.get("backend", "jax"), "views": {}}
  by_view = view_kernels(learner, state, images, views, n_per_task=n_per_task,
                         num_probes=num_probes, seed=seed, checkpoint=meta["checkpoint_id"],
                         log=log, devices=devices, **ntk_kwargs)
  for view, jk in by_view.items():
    y = np.concatenate([labels[t][jk.indices[t]] for t in jk.tasks])
    if write:
      jk.save(os.path.join(out_dir, f"kernel_{view}.npz"))
    rep = metrics.block_report(jk.k, jk.task_index, y)
    rep.update(seconds=jk.meta["seconds"], profile=jk.meta.get("profile", {}))
    report["views"][view] = rep
    if plot and write:
      plots.joint_kernel(jk, os.path.join(out_dir, f"kernel_{view}.png"), f"joint NTK, {view}")
      plots.alignment_matrix(jk, os.path.join(out_dir, f"alignment_{view}.png"))
      plots.spectra(jk, os.path.join(out_dir, f"spectra_{view}.png"))
  main_view = "fused" if "fused" in by_view else next(iter(by_view))
  if "results" in meta:  # a finished run: its accuracy matrix
    ends = all(os.path.exists(joint.task_end_path(workdir, t)) for t in range(stream.num_tasks))
    report["check_a_overlap_vs_forgetting"] = experiments.overlap_vs_forgetting(
        [workdir],
        os.path.join(out_dir, "check_a_overlap_vs_forgetting.png") if plot and write else None,
        kernel=None if ends else by_view[main_view])
  if len(by_view) > 1:
    report["check_c_views"] = experiments.view_ranks(by_view)
  if write:
    results_lib.atomic_write_json(os.path.join(out_dir, "report.json"),
                                  results_lib.jsonable(report))
    log(f"wrote {out_dir}/report.json" + (" and plots" if plot else ""))
  return report


def _checkpoint_metas(workdir: str) -> dict:
  """{checkpoint id: its saved metadata (position, counters, task_records)} of a run."""
  ckdir, ids = os.path.join(workdir, "checkpoints"), []
  if os.path.isdir(ckdir):
    ck = run_state.RunCheckpointer(ckdir, keep=100000, async_save=False)
    ids = [int(i) for i in ck.all_ids()]
    ck.close()
  if not ids:
    raise FileNotFoundError(f"{ckdir}: no complete checkpoint there; point --workdir at a "
                            "training run's workdir (python -m ntkcl_jax.train --workdir=...)")
  out = {}
  for cid in ids:
    with open(os.path.join(ckdir, str(cid), "meta", "metadata")) as f:
      out[cid] = json.load(f)
  return out


def task_end_checkpoints(workdir: str) -> dict:
  """{task t: id of the checkpoint saved at the end of task t} among the kept checkpoints."""
  ends = {}
  for cid, meta in sorted(_checkpoint_metas(workdir).items()):
    pos, done = meta["position"], len(meta["task_records"])
    if pos["task"] == done and pos["epoch"] == 0 and pos["batch"] == 0 and done > 0:
      ends.setdefault(done - 1, cid)
  return ends


def task_end_kernels(workdir: str, n_per_task: int = 8, num_probes: int = 8,
                     views=("fused",), seed: int = 0, log=print, **ntk_kwargs) -> dict:
  """Kernels of every task-end checkpoint into joint.task_end_path(workdir, t); tasks whose
  kernels exist are skipped. Returns {task: its output directory}."""
  ends = task_end_checkpoints(workdir)
  num_tasks = _num_tasks(workdir)
  missing = sorted(set(range(num_tasks)) - set(ends))
  todo = {t: c for t, c in ends.items()
          if not all(os.path.exists(joint.task_end_path(workdir, t, v)) for v in views)}
  if missing and any(not os.path.exists(joint.task_end_path(workdir, t, v))
                     for t in missing for v in views):
    raise FileNotFoundError(
        f"{workdir}: no checkpoint of the end of tasks {missing} (only the newest "
        f"train.keep_checkpoints are kept); retrain with --config.train.keep_checkpoints="
        f"{num_tasks + 1} --config.train.checkpoint_every_steps=0 (or a keep_checkpoints of at "
        "least steps plus tasks)")
  for t, cid in sorted(todo.items()):
    analyse(workdir, n_per_task, num_probes, views, checkpoint=cid, seed=seed,
            out_dir=os.path.dirname(joint.task_end_path(workdir, t)), log=log, plot=False,
            **ntk_kwargs)
  return {t: os.path.dirname(joint.task_end_path(workdir, t)) for t in range(num_tasks)}


def _num_tasks(workdir: str) -> int:
  metas = _checkpoint_metas(workdir)
  return int(metas[max(metas)]["num_tasks"])


def every_checkpoint(workdir: str, n_per_task: int = 8, num_probes: int = 4, seed: int = 0,
                     view: str = "fused", **ntk_kwargs) -> Iterator[dict]:
  """For each kept checkpoint within a task (in order): {checkpoint, step, task, kernel, f,
  params, x}, the joint kernel of `view` on fixed subsets of every task (experiments.lazy_regime
  reads it; train with train.checkpoint_every_steps=1 for a point per step).

  The readout closes over the frozen PEFT sets, which change at task ends only: one readout and
  one kernels.ntk_fn (compiled once) serve every checkpoint with the same frozen sets."""
  ids = sorted(_checkpoint_metas(workdir))
  config, learner, _, _ = runs.load_run(workdir, ids[0])
  images, _ = task_data(data.build_stream(config))
  probe = readouts.probes(learner.spec.feature_dim, num_probes, seed)
  x = np.concatenate([images[t][joint.subset_indices(seed, t, len(images[t]), n_per_task)]
                      for t in sorted(images)])
  frozen, f, kernel_fn = None, None, None
  for cid in ids:
    state, meta = runs.restore_state(workdir, learner, cid)
    task = len(meta["task_records"])  # tasks finished; this checkpoint is within task `task`
    if task >= len(images):
      break  # the checkpoint after the last task
    now = jax.tree_util.tree_map(np.asarray, learner.frozen(state))
    if frozen is None or not _tree_equal(frozen, now):
      frozen = now
      f, params = readouts.model_readout(learner, state, view, probe)
      kernel_fn = kernels.ntk_fn(f, **ntk_kwargs)
    else:
      params = readouts.readout_params(learner, state)
    jk = joint.compute(f, params, images, n=n_per_task, seed=seed, checkpoint=str(cid),
                       readout=f"feature_sketch/{view}", probe_seed=seed, kernel_fn=kernel_fn,
                       **ntk_kwargs)
    yield {"checkpoint": cid, "step": int(meta["counters"]["global_step"]), "task": task,
           "kernel": jk, "f": f, "params": params, "x": x}


def _tree_equal(a, b) -> bool:
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(np.array_equal(u, v) for u, v in zip(la, lb))


def main(_):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  kw = dict(backend=FLAGS.backend, implementation=FLAGS.implementation,
            chunk=FLAGS.chunk or None, devices=_devices(FLAGS.devices),
            memory_limit=int(FLAGS.memory_limit_gb * 2**30) if FLAGS.memory_limit_gb > 0 else None)
  if FLAGS.task_ends:
    task_end_kernels(FLAGS.workdir, FLAGS.n_per_task, FLAGS.probes, FLAGS.views, FLAGS.seed, **kw)
    return
  analyse(FLAGS.workdir, FLAGS.n_per_task, FLAGS.probes, FLAGS.views,
          None if FLAGS.checkpoint < 0 else FLAGS.checkpoint, FLAGS.seed, **kw)


def _devices(spec: str):
  """--devices: 'all' or a count n (this process's first n devices)."""
  if spec == "all":
    return "all"
  try:
    n = int(spec)
  except ValueError:
    n = 0
  if not 0 < n <= jax.local_device_count():
    raise app.UsageError(f"--devices={spec}: 'all' or a count from 1 to this process's "
                         f"{jax.local_device_count()} devices")
  return jax.local_devices()[:n]


def _define_flags() -> None:
  """Registers this CLI's flags; only when run as a program, so importing the module
  next to other CLIs (tests, notebooks) never clashes on a flag name."""
  flags.DEFINE_string("workdir", "", "training run's workdir")
  flags.DEFINE_integer("n_per_task", 16, "images per task in the joint kernel")
  flags.DEFINE_integer("probes", 8, "random probes of the feature sketch")
  flags.DEFINE_list("views", ["fused", "channel", "patch", "all"], "feature views (all = stacked)")
  flags.DEFINE_bool("task_ends", False, "kernels of every task-end checkpoint into "
                    "WORKDIR/ntk/task<t>/ (instead of one checkpoint into WORKDIR/ntk/)")
  flags.DEFINE_enum("backend", "jax", ["jax", "neural_tangents"], "kernel backend")
  flags.DEFINE_integer("implementation", 1, "neural-tangents implementation (backend=neural_tangents)")
  flags.DEFINE_integer("chunk", 0, "samples per Jacobian panel (0: the largest that fits the "
                       "memory budget)")
  flags.DEFINE_float("memory_limit_gb", 0, "memory budget of one kernel in GiB (0: half of the "
                     "available memory, at most 1.5)")
  flags.DEFINE_integer("checkpoint", -1, "checkpoint id (-1: newest)")
  flags.DEFINE_integer("seed", 0, "subset and probe seed")
  flags.DEFINE_string("devices", "all", "devices the Jacobian calls split their samples over: "
                      "'all' (every device of every process) or a count of this process's")
  flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process analysis)")
  flags.DEFINE_integer("num_processes", 1, "number of processes (-1: discover, TPU pods)")
  flags.DEFINE_integer("process_id", 0, "this process's index (multi-process analysis)")


if __name__ == "__main__":
  _define_flags()
  app.run(cli.guard(main))  # a workdir that is not a run: one `error:` line, exit 2
