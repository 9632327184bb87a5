r"""Compute-policy benchmark: the NTK-CL train step in float32 vs bfloat16, einsum vs fused
attention, remat off vs on; prints a markdown section for docs/benchmarks.md.

    python -m benchmarks.precision              # ViT-S/16 width, 6 blocks, 64 px, batch 16, CPU
    python -m benchmarks.precision --depth=0 --steps=5    # all 12 blocks (about twice as long)
    python -m benchmarks.precision --model=DINOv2-S/14 --image_size=56
    python -m benchmarks.precision --accuracy_seeds=0,1,2,3,4   # + whole runs, bf16 vs f32

What is timed: `Learner.step_given` (every NTK-CL branch pass, all loss terms, gradients, the SGD
update; official settings: ffn_num 16, P = 10, one frozen set) on random images with a random
backbone, state carried from step to step. Every setting is compiled and warmed up first, then
the settings are timed in turn, `--steps` rounds, and each reports its median: a change of the
machine's load during the run then shifts all settings alike instead of one. The ratio to float32
einsum is taken within each round (paired) and printed as its median and its range over the
rounds: where the range straddles 1.00x, the two settings are within noise on this machine.
Memory: XLA's own estimate of the compiled step's temporary buffers
(`compiled.memory_analysis().temp_size_in_bytes`), which is what remat trades for recomputation. The bf16-vs-f32 accuracy of
a whole run is checked by tests/test_precision.py (tiny config); `--accuracy_seeds` also compares
whole runs on real data: the faithful Split-Imagenette runs of docs/results.md (real DINOv2-S/14,
its scale) against the same runs in bfloat16, paired by seed (the finished ones: python -m
scripts.results_page trains them, in its run directory), with each run's wall time.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import train_step
from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import evidence
from ntkcl_jax import results
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import sharding
from ntkcl_jax.models import ntkcl
from ntkcl_jax.models import vit

# (label, model keys): the float32 einsum step without remat is the reference of every row.
SETTINGS = (
    ("float32, einsum", {}),
    ("bfloat16, einsum", {"dtype": "bfloat16"}),
    ("float32, fused attention", {"attention": "fused"}),
    ("float32, einsum, remat", {"remat": True}),
)


def cpu_bf16_flags() -> str:
  """The bf16 matmul instructions this CPU advertises (avx512_bf16, amx_bf16), or 'none'."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = set(f.read().split())
  except OSError:
    return "unknown (/proc/cpuinfo unreadable)"
  found = sorted(flags & {"avx512_bf16", "amx_bf16"})
  return ", ".join(found) if found else "none"


def make_config(model: str, image_size: int, depth: int, batch: int, **policy):
  """configs/tiny.py turned into the official NTK-CL settings on `model` (random backbone)."""
  c = config_files.load_config_file("configs/tiny.py")
  c.model.name, c.model.image_size = model, image_size
  c.model.overrides = ml_collections.ConfigDict({"num_layers": depth} if depth else {})
  c.model.update(policy)
  c.method.ffn_num, c.method.num_prompt_tokens = 16, 10
  c.optim.batch_size = batch
  c.data.num_classes, c.data.init_cls, c.data.increment = 20, 10, 10
  c.train.mesh_data = 1
  return c


def paired_ratio(times, ref_times) -> tuple:
  """(median, min, max) over rounds of time / reference time within the same round."""
  q = [t / t_ref for t, t_ref in zip(times, ref_times, strict=True)]
  return statistics.median(q), min(q), max(q)


def step_and_args(config, backbone, batch: int, state=None):
  """`Learner.step_given` with its arguments (task 0, fixed NCE rows and dropout key). `state`:
  a start-of-task state to reuse (the compute policy does not change the state's shapes)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  lrn = learner_lib.Learner(config, backbone, mesh)
  if state is None:
    state = lrn._new_task(lrn.init_state(jax.random.PRNGKey(0)))  # pylint: disable=protected-access
  size = config.model.image_size
  rng = np.random.RandomState(0)
  b = {"image": jnp.asarray(rng.rand(batch, size, size, 3), jnp.float32),
       "label": jnp.asarray(rng.randint(0, 10, batch), jnp.int32),
       "mask": jnp.ones(batch, bool)}
  k_rows, k_drop = jax.random.split(jax.random.PRNGKey(1))
  rows = lrn.nce_rows(k_rows, jnp.int32(0), jnp.int32(10))
  return lrn.step_given, (state, lrn.backbone, b, jnp.float32(0.01), jnp.int32(0),
                          jnp.int32(10), rows, k_drop)


# bf16 against f32 over whole runs: 'no effect' if the paired interval lies within this many
# accuracy points (the criterion of the accuracy table, fixed before measuring).
ACC_MARGIN = 1.0


def accuracy_lines(seeds, workdir: str) -> list:
  """The finished faithful Split-Imagenette runs of docs/results.md in float32 and in bfloat16
  (scripts/results_page.py trains them; nothing is trained here), paired by seed: a markdown
  table of Ā, A_T and wall time per run, and the paired differences with Student-t intervals
  and a verdict against ACC_MARGIN."""
  from scripts import pages  # pylint: disable=g-import-not-at-top  # the runs' owner
  scale = pages.DEFAULT_SCALE
  runs = {m: {s: pages.finished_cell("imagenette", m, s, scale, workdir) for s in seeds}
          for m in ("official", "official_bf16")}
  done = [s for s in seeds if runs["official"][s] and runs["official_bf16"][s]]
  lines = ["", f"Whole runs on real data: Split-Imagenette at docs/results.md's scale (`{scale}`, "
           f"real DINOv2-S/14), faithful NTK-CL in float32 and in bfloat16 compute, the seeds of "
           f"{list(seeds)} whose two runs are finished: {done} (same class order, images and "
           f"initialisation within a seed); runs in "
           f"{os.path.relpath(workdir, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}"
           f"/imagenette/{{official,official_bf16}}/seed<s>.", "",
           "| seed | Ā f32 | Ā bf16 | A_T f32 | A_T bf16 | max abs diff of the accuracy matrix | "
           "wall s f32 | wall s bf16 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for s in done:
    a, b = runs["official"][s], runs["official_bf16"][s]
    ma, mb = (np.array([[np.nan if v is None else v for v in row] for row in r["accuracy_matrix"]])
              for r in (a, b))
    lines.append(f"| {s} | {a['avg_incremental_accuracy']:.2f} | "
                 f"{b['avg_incremental_accuracy']:.2f} | {a['last_accuracy']:.2f} | "
                 f"{b['last_accuracy']:.2f} | {np.nanmax(np.abs(ma - mb)):.2f} | "
                 f"{a['wall_time_s']:.0f} | {b['wall_time_s']:.0f} |")
  lines += ["", "Wall times are as the runs recorded them, some while other jobs shared the CPU, "
            "so they are not a speed comparison; the step times above are.", "",
            f"Paired bf16 − f32 (mean over seeds, Student-t 95% interval, the bootstrap beside it); "
            f"criterion: no effect if the interval lies within ±{ACC_MARGIN:g} point:", ""]
  for key, name in (("avg_incremental_accuracy", "ΔĀ"), ("last_accuracy", "ΔA_T")):
    iv = evidence.paired({s: runs["official_bf16"][s][key] for s in done},
                         {s: runs["official"][s][key] for s in done})
    lines.append(f"- {name}: {evidence.describe(iv, '=0', ACC_MARGIN)}")
  return lines


def define_flags(fv) -> None:
  flags.DEFINE_string("model", "ViT-S/16", f"ViT variant: {vit.variant_names()}", flag_values=fv)
  flags.DEFINE_integer("image_size", 64, "image size (px)", flag_values=fv)
  flags.DEFINE_integer("depth", 6,
                       "number of blocks (0 = the variant's; 6 keeps the run under ~5 min on 2 "
                       "CPU cores, compile time grows with depth)", flag_values=fv)
  flags.DEFINE_integer("batch", 16, "images per train step", flag_values=fv)
  flags.DEFINE_integer("steps", 15, "timed rounds of the settings", flag_values=fv)
  flags.DEFINE_string("accuracy_seeds", "",
                      "also compare whole runs (docs/results.md's faithful Split-Imagenette runs) "
                      "in f32 and bf16 for these seeds, e.g. 0,1,2,3,4", flag_values=fv)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags.DEFINE_string("workdir", os.path.join(repo, "runs", "results"),
                      "run directory of those runs", flag_values=fv)


def _main(fv):
  try:
    acc_seeds = [int(x) for x in fv.accuracy_seeds.split(",") if x]
  except ValueError as e:
    raise cli.InputError(f"--accuracy_seeds={fv.accuracy_seeds}: comma-separated integers") from e
  if fv.model not in vit.variant_names():
    raise cli.InputError(f"--model={fv.model}: unknown ViT variant; known {vit.variant_names()}")
  if fv.batch < 1 or fv.steps < 1 or fv.depth < 0 or fv.image_size < 1:
    raise cli.InputError("--batch, --steps and --image_size must be >= 1, --depth >= 0")
  base = make_config(fv.model, fv.image_size, fv.depth, fv.batch)
  vcfg = ntkcl.vit_config(base)  # also checks image_size against the patch size
  backbone = vit.init_params(vcfg, jax.random.PRNGKey(0))
  runners, rows = [], []
  for label, policy in SETTINGS:
    cfg = make_config(fv.model, fv.image_size, fv.depth, fv.batch, **policy)
    jitted, args = step_and_args(cfg, backbone, fv.batch, rows[0][1]["state"] if rows else None)
    t0 = time.perf_counter()
    compiled, once = train_step.compiled_runner(jitted, args, carry_index=0)
    compile_s = time.perf_counter() - t0
    once()  # warm-up
    mem = compiled.memory_analysis()
    runners.append(once)
    rows.append((label, {"compile_s": compile_s, "times": [], "state": args[0],
                         "temp_bytes": getattr(mem, "temp_size_in_bytes", 0) if mem else 0}))
    print(f"  compiled {label} in {compile_s:.0f} s", file=sys.stderr, flush=True)
  for _ in range(fv.steps):
    for once, (_, r) in zip(runners, rows):
      t0 = time.perf_counter()
      once()
      r["times"].append(time.perf_counter() - t0)
  ref = rows[0][1]
  for _, r in rows:
    r["s_per_step"] = statistics.median(r["times"])
    r["ratio"] = paired_ratio(r["times"], ref["times"])
  lines = [
      f"## Compute policy: bf16, fused attention, remat ({fv.model} width, {vcfg.num_layers} "
      f"blocks, {vcfg.image_size} px, batch {fv.batch}, CPU)", "",
      f"`python -m benchmarks.precision --model={fv.model} --depth={fv.depth} "
      f"--image_size={fv.image_size} --batch={fv.batch} --steps={fv.steps}"
      + (f" --accuracy_seeds={fv.accuracy_seeds}`" if acc_seeds else "`"), "",
      f"{results.cpu()}, {os.cpu_count()} CPU threads, JAX {jax.__version__} on "
      f"{jax.devices()[0].platform}; bf16 matmul instructions on this CPU: {cpu_bf16_flags()}. "
      f"One NTK-CL train step (`Learner.step_given`), {vcfg.num_layers} blocks, random weights; "
      f"median of {fv.steps} steps (settings timed in turn) after compiling; XLA temp = the "
      "compiled step's temporary buffers (`memory_analysis()`).", "",
      "| setting | ms/step | vs float32 einsum: median [range] of the rounds | compile s | "
      "XLA temp MB |",
      "|---|---:|---:|---:|---:|"]
  for label, r in rows:
    lines.append(f"| {label} | {r['s_per_step'] * 1e3:.0f} | {r['ratio'][0]:.2f}x "
                 f"[{r['ratio'][1]:.2f}, {r['ratio'][2]:.2f}] | {r['compile_s']:.1f} | "
                 f"{r['temp_bytes'] / 2**20:.1f} |")
  if acc_seeds:
    lines += accuracy_lines(acc_seeds, fv.workdir)
  print("\n".join(lines))
  return rows


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  main()  # exit status 0, or 2 with one error line for bad input (cli.run_program)
