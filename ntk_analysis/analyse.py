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
Only the drawn subsets of the images are decoded (run_data.task_data). Writes DIR/ntk/:
kernel_<view>.npz (kernel + metadata), report.json (metrics per task and task pair, and the
single-run descriptions of ntk_analysis/report.py), and PNG plots. --task_ends writes the kernels
of each task end to DIR/ntk/task<t>/ (joint.task_end_path), which that report reads;
the run must have kept those checkpoints (train.keep_checkpoints at least the number of tasks with
train.checkpoint_every_steps=0, or at least steps plus tasks).
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional, Sequence

from absl import app, flags, logging
import numpy as np

import jax

from ntk_analysis import joint, kernels, metrics, plots, readouts, run_data
from ntk_analysis import report as single_run
from ntkcl_jax import cli, data, sharding
from ntkcl_jax import results as results_lib
from ntkcl_jax.checkpoints import runs

FLAGS = flags.FLAGS


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
            log=print, plot: bool = True, devices=None, compute: str = "float32",
            **ntk_kwargs) -> dict:
  """Computes and writes the kernels, report and plots of one checkpoint (None: the newest) of a
  run; returns the report. `devices`: those the Jacobian calls split their samples over
  (kernels.device_mesh: None one device, 'all' every device of every process, the CLI's
  default); with devices of several processes only process 0 writes. `ntk_kwargs` configure
  kernels.ntk_fn (chunk, memory_limit, backend, implementation, ...). `compute`: 'float32' (the
  kernels at float32 whatever the run trained in) or 'run' (the run's own compute policy)."""
  out_dir = out_dir or os.path.join(workdir, "ntk")
  spans = {d.process_index for d in kernels.device_mesh(devices).devices.reshape(-1)}
  write = jax.process_index() == 0 or spans == {jax.process_index()}
  if write:
    os.makedirs(out_dir, exist_ok=True)
  config, learner, state, meta = runs.load_run(workdir, checkpoint, compute=compute)
  stream = data.build_stream(config)
  images, labels = run_data.task_data(stream)
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
    report["check_a_overlap_vs_forgetting"] = single_run.overlap_vs_forgetting(
        [workdir],
        os.path.join(out_dir, "check_a_overlap_vs_forgetting.png") if plot and write else None,
        kernel=None if ends else by_view[main_view])
  if len(by_view) > 1:
    report["check_c_views"] = single_run.view_ranks(by_view)
  if write:
    results_lib.atomic_write_json(os.path.join(out_dir, "report.json"),
                                  results_lib.jsonable(report))
    log(f"wrote {out_dir}/report.json" + (" and plots" if plot else ""))
  return report


def task_end_kernels(workdir: str, n_per_task: int = 8, num_probes: int = 8,
                     views=("fused",), seed: int = 0, log=print, **ntk_kwargs) -> dict:
  """Kernels of every task-end checkpoint into joint.task_end_path(workdir, t); tasks whose
  kernels exist are skipped. Returns {task: its output directory}."""
  num_tasks = run_data.num_tasks(workdir)
  todo = [t for t in range(num_tasks)
          if not all(os.path.exists(joint.task_end_path(workdir, t, v)) for v in views)]
  ends = run_data.require_task_ends(workdir, todo)
  for t in todo:
    analyse(workdir, n_per_task, num_probes, views, checkpoint=ends[t], seed=seed,
            out_dir=os.path.dirname(joint.task_end_path(workdir, t)), log=log, plot=False,
            **ntk_kwargs)
  return {t: os.path.dirname(joint.task_end_path(workdir, t)) for t in range(num_tasks)}


def every_checkpoint(workdir: str, n_per_task: int = 8, num_probes: int = 4, seed: int = 0,
                     view: str = "fused", **ntk_kwargs) -> Iterator[dict]:
  """For each kept checkpoint within a task (in order): {checkpoint, step, task, kernel, f,
  params, x}, the joint kernel of `view` on fixed subsets of every task (a lazy-regime study
  reads it; train with train.checkpoint_every_steps=1 for a point per step).

  The readout closes over the frozen PEFT sets, which change at task ends only: one readout and
  one kernels.ntk_fn (compiled once) serve every checkpoint with the same frozen sets."""
  ids = sorted(run_data.checkpoint_metas(workdir))
  config, learner, _, _ = runs.load_run(workdir, ids[0])
  images, _ = run_data.task_data(data.build_stream(config))
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
  kw = dict(backend=FLAGS.backend, implementation=FLAGS.implementation, compute=FLAGS.compute,
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
  flags.DEFINE_enum("compute", "float32", ["float32", "run"], "the kernels' compute policy: "
                    "float32 whatever the run trained in, or the run's own (e.g. its bfloat16)")
  flags.DEFINE_integer("seed", 0, "subset and probe seed")
  flags.DEFINE_string("devices", "all", "devices the Jacobian calls split their samples over: "
                      "'all' (every device of every process) or a count of this process's")
  flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process analysis)")
  flags.DEFINE_integer("num_processes", 1, "number of processes (-1: discover, TPU pods)")
  flags.DEFINE_integer("process_id", 0, "this process's index (multi-process analysis)")


if __name__ == "__main__":
  _define_flags()
  app.run(cli.guard(main))  # a workdir that is not a run: one `error:` line, exit 2
