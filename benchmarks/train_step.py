r"""Training-step benchmark: images/s, s/step, XLA FLOPs and the fraction of the machine's matmul
throughput that the NTK-CL train step achieves.

    python -m benchmarks.train_step --model=ViT-B/16 --batch=8 --steps=3 --variant=official
    python -m benchmarks.train_step --model=tiny --batch=16 --steps=20
    python -m benchmarks.train_step --table          # tiny, ViT-S/16, ViT-B/16 x variants
    python -m benchmarks.train_step --model=ViT-B/16 --batch=16 --profile   # + where time goes

What is timed: one jitted train step of the learner (all NTK-CL branch passes, losses, gradients,
optimiser update) on random images, after a warm-up step that compiles it; the median over
`--steps` steps. FLOPs come from XLA's own cost analysis of that compiled step
(`jitted.lower(...).compile().cost_analysis()`). The machine's float32 matmul throughput is
measured in the same process (a 2048^3 jitted matmul, best of 5), so "fraction" is achieved
FLOP/s over what XLA reaches on a large matmul on the same hardware. Two reference rows help read where
the time goes: a single plain ViT forward pass, and a plain ViT forward + backward.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import learner as learner_lib
from ntkcl_jax import sharding
from ntkcl_jax import switches
from ntkcl_jax import train
from ntkcl_jax.models import vit


def matmul_throughput(n: int = 2048, repeats: int = 5) -> float:
  """Best float32 FLOP/s of an n x n x n matmul under jit on the default device."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.float32)
  b = jax.random.normal(k2, (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = min(_timeit(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
  return 2.0 * n ** 3 / best


def _timeit(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan")))


def compiled_runner(jitted, args, carry_index=None):
  """(compiled, once): `once()` runs one step to completion; if carry_index is given, output[0]
  replaces args[carry_index] afterwards (a real training loop's state carry)."""
  compiled = jitted.lower(*args).compile()
  args = list(args)

  def once():
    out = compiled(*args)
    jax.block_until_ready(out)
    if carry_index is not None:
      args[carry_index] = out[0]
  return compiled, once


def time_step(jitted, args, steps: int, carry_index=None) -> dict:
  """Compiles, warms up and times `jitted(*args)`; if carry_index is given, output[0] replaces
  args[carry_index] after each step (a real training loop's state carry)."""
  t0 = time.perf_counter()
  compiled, once = compiled_runner(jitted, args, carry_index)
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  mem = compiled.memory_analysis()
  once()  # warm-up
  times = [_timeit(once) for _ in range(steps)]
  return {"compile_s": compile_s, "s_per_step": statistics.median(times), "flops": flops,
          "temp_bytes": getattr(mem, "temp_size_in_bytes", 0) if mem else 0}


def vit_config(model: str, depth: int, image_size: int):
  over = {}
  if depth:
    over["num_layers"] = depth
  if image_size:
    over["image_size"] = image_size
  return vit.get_config(model, **over)


def reference_steps(vcfg, batch: int):
  """(forward, forward+backward) of one plain ViT pass, as jitted functions with their args."""
  model = vit.ViT(vcfg)
  params = vit.init_params(vcfg, jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (batch, vcfg.image_size, vcfg.image_size, 3))
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)))
  return (fwd, (params, x)), (grad, (params, x))


def ntkcl_step(vcfg, batch: int, variant: str):
  """The learner's jitted train step (`Learner._step`) with its arguments, state carried.

  Settings of the official code (docs/method.md §3.1): ffn_num 16, P = 10, one frozen set, no init-PTM;
  `variant='corrected'` turns all six switches on. Tasks of 10 classes; random images and labels.
  """
  config = config_files.load_config_file("configs/tiny.py")
  config.model.name = vcfg.name
  config.model.image_size = vcfg.image_size
  config.model.overrides = {k: getattr(vcfg, k) for k in (
      "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")}
  config.method.variant = variant
  for k in switches.affecting(init_cls=10, increment=10):  # the split set below
    config.method[k] = variant == "corrected"
  config.method.ffn_num = 16
  config.method.num_prompt_tokens = 10
  config.optim.batch_size = batch
  config.data.num_classes, config.data.init_cls, config.data.increment = 20, 10, 10
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  params = vit.init_params(vcfg, jax.random.PRNGKey(0))
  learner = learner_lib.Learner(config, params, mesh)
  state = learner._new_task(learner.init_state(jax.random.PRNGKey(0)))  # pylint: disable=protected-access
  rng = np.random.RandomState(0)
  host = {"image": rng.rand(batch, vcfg.image_size, vcfg.image_size, 3).astype(np.float32),
          "label": rng.randint(0, 10, batch).astype(np.int32), "mask": np.ones(batch, bool)}
  args = (state, learner.backbone, sharding.global_batch(host, mesh), jnp.float32(0.01),
          jnp.int32(0), jnp.int32(10), jnp.bool_(False))  # last: log_now (metrics window)
  return learner._step, args, 0  # pylint: disable=protected-access


def _kind(name: str, hlo_line: str) -> str:
  """Coarse class of one executed XLA:CPU op (thunk) from its name and HLO text."""
  if name.startswith(("ynn_fusion", "dot", "onednn", "xnn", "convolution")) or \
      "custom_call_target=\"__onednn" in hlo_line:
    return "matmul / conv (GEMM libraries, XLA dot)"
  if name.startswith(("copy", "transpose")) or "_copy_fusion" in name or "copy_bitcast" in name:
    return "copies and layout transposes"
  if "reduce" in name:
    return "reductions (LayerNorm, softmax sums)"
  if "fusion" in name or name.startswith("wrapped_"):
    return "elementwise fusions (GELU, softmax exp, residual adds, ...)"
  return "other (control flow, small ops)"


def profile_step(jitted, args, carry_index=None, top: int = 12) -> list[str]:
  """Where one step's time goes: the XLA:CPU ops of one traced step, summed by kind and by the
  model code they come from (HLO op_name metadata). Op times overlap when XLA runs independent
  ops on both threads, so they can sum to more than the step's wall time."""
  compiled, once = compiled_runner(jitted, args, carry_index)
  once()  # warm-up
  once()
  hlo, comp_src, current = {}, {}, None
  for line in compiled.as_text().splitlines():
    head = re.match(r"\s*%?([\w.\-]+) .*\{\s*$", line)
    if head and " = " not in line:  # a computation's header: remember its first op_name
      current = head.group(1)
      continue
    m = re.match(r"\s*%?([\w.\-]+) = ", line)
    if m:
      hlo[m.group(1)] = line
      src = re.search(r'op_name="([^"]+)"', line)
      if current and src and current not in comp_src:
        comp_src[current] = src.group(1)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, profiler_options=train.trace_options())
    wall = _timeit(once)
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      return ["(no trace written: profiler plugin unavailable)"]
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  by_kind, by_src, n_kind = collections.Counter(), collections.Counter(), collections.Counter()
  by_dir = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name not in hlo:
      continue
    line = hlo[name]
    kind = _kind(name, line)
    m = re.search(r'op_name="([^"]+)"', line)
    called = re.search(r"calls=%?([\w.\-]+)", line)
    src = m.group(1) if m else comp_src.get(called.group(1) if called else "", None)
    src = src or "(no source: " + re.sub(r"\.\d+$", "", name) + ")"
    direction = "backward" if "transpose(jvp" in src else "forward"
    src = re.sub(r"encoderblock_\d+", "block*", src)
    src = src.split("block*/", 1)[1] if "block*/" in src else "/".join(src.split("/")[-2:])
    by_kind[kind] += e["dur"]
    n_kind[kind] += 1
    by_dir[direction] += e["dur"]
    by_src[(kind.split(" ")[0], direction, src)] += e["dur"]
  total = sum(by_kind.values())
  lines = [f"one traced step: {wall:.3f} s wall; XLA:CPU op time {total / 1e6:.3f} s "
           "(ops on the two threads overlap)", "",
           f"{'kind of op':<60} {'op time s':>9} {'share':>6} {'ops':>6}"]
  for k, v in by_kind.most_common():
    lines.append(f"{k:<60} {v / 1e6:>9.3f} {100 * v / total:>5.1f}% {n_kind[k]:>6}")
  lines += ["", "  ".join(f"{d} pass ops {v / 1e6:.3f} s ({100 * v / total:.1f}%)"
                          for d, v in sorted(by_dir.items())),
            "", f"top {top} sources (model code; the 12 blocks and the passes merged):",
            f"{'kind':<12} {'pass':<9} {'source':<60} {'op time s':>9} {'share':>6}"]
  for (k, d, src), v in by_src.most_common(top):
    lines.append(f"{k:<12} {d:<9} {src[-60:]:<60} {v / 1e6:>9.3f} {100 * v / total:>5.1f}%")
  return lines


def run_one(model, depth, image_size, batch, steps, variant, peak) -> list[dict]:
  vcfg = vit_config(model, depth, image_size)
  rows = []
  jitted, args, carry = ntkcl_step(vcfg, batch, variant)
  rows.append({"what": f"NTK-CL train step ({variant})",
               **time_step(jitted, args, steps, carry_index=carry)})
  (fwd, fargs), (grad, gargs) = reference_steps(vcfg, batch)
  rows.append({"what": "reference: 1 ViT forward", **time_step(fwd, fargs, steps)})
  rows.append({"what": "reference: 1 ViT fwd+bwd", **time_step(grad, gargs, steps)})
  for r in rows:
    r.update(model=f"{vcfg.name} d{vcfg.num_layers} {vcfg.image_size}px", batch=batch,
             images_per_s=batch / r["s_per_step"], flop_per_s=r["flops"] / r["s_per_step"],
             fraction=r["flops"] / r["s_per_step"] / peak)
  return rows


def print_rows(rows, peak):
  print(f"\nmachine float32 matmul throughput (2048^3, same process): {peak / 1e9:.1f} GFLOP/s "
        f"on {jax.device_count()} device(s), {os.cpu_count()} CPU threads visible")
  print(f"{'model':<24} {'what':<32} {'batch':>5} {'img/s':>8} {'s/step':>8} {'GFLOP':>9} "
        f"{'GFLOP/s':>8} {'of peak':>7} {'compile s':>9} {'XLA temp MB':>11}")
  for r in rows:
    print(f"{r['model']:<24} {r['what']:<32} {r['batch']:>5} {r['images_per_s']:>8.2f} "
          f"{r['s_per_step']:>8.3f} {r['flops'] / 1e9:>9.2f} {r['flop_per_s'] / 1e9:>8.1f} "
          f"{100 * r['fraction']:>6.1f}% {r['compile_s']:>9.1f} {r['temp_bytes'] / 2**20:>11.0f}")
  print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
        f" MB")


def define_flags(fv) -> None:
  flags.DEFINE_string("model", "tiny", f"ViT variant: {vit.variant_names()}", flag_values=fv)
  flags.DEFINE_integer("depth", 0, "number of blocks (0 = the variant's)", flag_values=fv)
  flags.DEFINE_integer("image_size", 0, "0 = the variant's default", flag_values=fv)
  flags.DEFINE_integer("batch", 16, "images per train step", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "timed steps (median)", flag_values=fv)
  flags.DEFINE_enum("variant", "official", ["official", "corrected"],
                    "official settings, or all six switches on", flag_values=fv)
  flags.DEFINE_bool("table", False, "tiny, ViT-S/16 and ViT-B/16 at batch 16, both variants",
                    flag_values=fv)
  flags.DEFINE_bool("profile", False, "also trace one NTK-CL step and print where its time goes",
                    flag_values=fv)


def _main(fv):
  if fv.model not in vit.variant_names():  # checked before the matmul probe, not after it
    raise cli.InputError(f"--model={fv.model}: unknown ViT variant; known {vit.variant_names()}")
  if fv.batch < 1 or fv.steps < 1 or fv.depth < 0 or fv.image_size < 0:
    raise cli.InputError("--batch and --steps must be >= 1, --depth and --image_size >= 0")
  if fv.profile:
    # its own learner: the timing below then reports a real (uncached) compile time
    vcfg = vit_config(fv.model, fv.depth, fv.image_size)
    print(f"where the time goes: NTK-CL train step ({fv.variant}), {vcfg.name} "
          f"d{vcfg.num_layers} {vcfg.image_size}px, batch {fv.batch}")
    print("\n".join(profile_step(*ntkcl_step(vcfg, fv.batch, fv.variant))), flush=True)
  peak = matmul_throughput()
  rows = []
  if fv.table:
    for model in ("tiny", "ViT-S/16", "ViT-B/16"):
      for variant in ("official", "corrected"):
        rows += run_one(model, 0, 0, 16, fv.steps, variant, peak)
  else:
    rows = run_one(fv.model, fv.depth, fv.image_size, fv.batch, fv.steps, fv.variant, peak)
  print_rows(rows, peak)
  return rows


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  main()  # exit status 0, or 2 with one error line for bad input (cli.run_program)
