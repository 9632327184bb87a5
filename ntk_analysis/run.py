r"""Empirical NTKs of a training run: `python -m ntk_analysis.run --workdir=DIR`.

Reads the newest checkpoint of DIR (a `python -m ntkcl_jax.train` workdir), draws fixed, seeded
subsets of each task's training images (test transform), and computes one joint kernel per view
over the trainable PEFT parameters (frozen backbone closed over), with a feature-sketch readout.
Writes DIR/ntk/: kernel_<view>.npz (kernel + metadata), report.json (metrics per task and task
pair, theory checks (a), (c), (e)), and PNG plots.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def analyse(workdir: str, n_per_task: int = 16, num_probes: int = 8, views=("fused",),
            backend: str = "jax", implementation: int = 1, chunk: int = 16, checkpoint=None,
            seed: int = 0, out_dir=None, log=print) -> dict:
  """Computes and writes the kernels, report and plots of one run; returns the report."""
  from ntk_analysis import checks, joint, metrics, run_plots, runs  # pylint: disable=g-import-not-at-top
  from ntkcl_jax import data  # pylint: disable=g-import-not-at-top
  out_dir = out_dir or os.path.join(workdir, "ntk")
  os.makedirs(out_dir, exist_ok=True)
  config, learner, state, meta = runs.load_run(workdir, checkpoint)
  stream = data.build_stream(config)
  images, labels = runs.task_data(stream)
  log(f"{workdir}: checkpoint {meta['checkpoint_id']}, {stream.num_tasks} tasks x "
      f"{n_per_task} images, method {config.method.name}/{config.method.variant}")
  probe = runs.probes(learner.spec.feature_dim, num_probes, seed)
  report = {"workdir": os.path.abspath(workdir), "checkpoint_id": meta["checkpoint_id"],
            "method": config.method.name, "variant": config.method.variant,
            "n_per_task": n_per_task, "probes": num_probes, "backend": backend, "views": {}}
  kernels_by_view = {}
  for view in views:
    f, params = runs.readout(learner, state, view, probe)
    t = time.time()
    jk = joint.compute(f, params, images, n=n_per_task, seed=seed,
                       checkpoint=str(meta["checkpoint_id"]), readout=f"feature_sketch/{view}",
                       probe_seed=seed, groups=sorted(params), method="jacobian", trace=True,
                       chunk=chunk, backend=backend, implementation=implementation)
    # feature sketch (spec 3.2): the sum, not the mean, over the R probes (x3 views for 'all'),
    # so that with probes N(0, I/(D R)) the kernel estimates the traced feature NTK
    outputs = num_probes * (3 if view == "all" else 1)
    jk.k = jk.k * outputs
    jk.meta.update(view=view, seconds=time.time() - t, sketch_outputs=outputs)
    y = np.concatenate([labels[t][jk.indices[t]] for t in jk.tasks])
    log(f"  view {view}: {jk.k.shape[0]}x{jk.k.shape[1]} kernel over {jk.meta['P']:,} "
        f"parameters in {jk.meta['seconds']:.1f} s")
    jk.save(os.path.join(out_dir, f"kernel_{view}.npz"))
    kernels_by_view[view] = jk
    rep = metrics.block_report(jk.k, jk.task_index, y)
    rep["spectra"] = checks.spectra(jk)["table"]
    rep["seconds"] = jk.meta["seconds"]
    report["views"][view] = rep
    run_plots.joint_kernel(jk, os.path.join(out_dir, f"kernel_{view}.png"), f"joint NTK, {view}")
    run_plots.alignment_matrix(jk, os.path.join(out_dir, f"alignment_{view}.png"))
    run_plots.spectra(jk, os.path.join(out_dir, f"spectra_{view}.png"))
  acc = (meta.get("results") or {}).get("accuracy_matrix")
  main = "fused" if "fused" in kernels_by_view else next(iter(kernels_by_view))
  if acc is not None:
    acc = np.array(acc, dtype=np.float64)
    report["check_a_overlap_vs_forgetting"] = checks.overlap_vs_forgetting(
        kernels_by_view[main], acc, os.path.join(out_dir, "check_a_overlap_vs_forgetting.png"))
  if len(kernels_by_view) > 1:
    report["check_c_views"] = checks.views(kernels_by_view)
  with open(os.path.join(out_dir, "report.json"), "w") as fh:
    json.dump(_clean(report), fh, indent=1)
  log(f"wrote {out_dir}/report.json and plots")
  return report


def _clean(x):
  """JSON-safe: numpy scalars -> float, NaN/inf -> None."""
  import math  # pylint: disable=g-import-not-at-top
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if hasattr(x, "item") and not isinstance(x, (str, bytes)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def main(_):
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  analyse(FLAGS.workdir, FLAGS.n_per_task, FLAGS.probes, FLAGS.views, FLAGS.backend,
          FLAGS.implementation, FLAGS.chunk, None if FLAGS.checkpoint < 0 else FLAGS.checkpoint,
          FLAGS.seed)


def _define_flags() -> None:
  """Registers this CLI's flags; only when run as a program, so importing the module
  next to other CLIs (tests, notebooks) never clashes on a flag name."""
  flags.DEFINE_string("workdir", "", "training run's workdir")
  flags.DEFINE_integer("n_per_task", 16, "images per task in the joint kernel")
  flags.DEFINE_integer("probes", 8, "random probes of the feature sketch")
  flags.DEFINE_list("views", ["fused", "channel", "patch", "all"], "feature views (all = stacked)")
  flags.DEFINE_enum("backend", "jax", ["jax", "neural_tangents"], "kernel backend")
  flags.DEFINE_integer("implementation", 1, "neural-tangents implementation (backend=neural_tangents)")
  flags.DEFINE_integer("chunk", 16, "samples per Jacobian chunk")
  flags.DEFINE_integer("checkpoint", -1, "checkpoint id (-1: newest)")
  flags.DEFINE_integer("seed", 0, "subset and probe seed")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
