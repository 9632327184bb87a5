"""Time and peak memory of one joint kernel (T tasks x n images) at the tiny config, per backend.

    python -m benchmarks.ntk --tasks 5 --n 64      # one subprocess per configuration
    python -m benchmarks.ntk --memory=activations  # estimate against measured peak (JSON)
    python -m benchmarks.ntk --device_counts=1,2,4,8   # joint kernel time per device count
    python -m benchmarks.ntk --memory=activations,tiny --device_counts=1,8   # a table

Model: tiny ViT (D=64, depth 4, 4 heads, patch 2 on 8x8 sklearn digits) with NTK-CL channel
adapters (r=8), a random frozen backbone, feature-sketch readout R=8 (docs/ntk_theory.md §4 "Tiny setting").
`--memory` runs one kernel of a case (MEMORY_CASES) on the process's devices and prints the
kernel's memory estimate beside the peak RSS the call added (Linux: /proc/self/status VmHWM,
reset before each call; elsewhere the process's ru_maxrss).
`--device_counts` runs each measurement in a subprocess with that many fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N); on an accelerator host it is the real
device count that counts, so there run it without `--device_counts` on 1 and on all devices.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ntk_analysis import kernel_memory, kernels, readouts
from ntkcl_jax import cli, tree_utils
from ntkcl_jax.models import ntkcl, vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # cwd of the subprocesses

CONFIGS = [("jax", "jacobian", 1), ("jax", "sum_of_logits", 1), ("jax", "ntvp", 1),
           ("neural_tangents", "jacobian", 1), ("neural_tangents", "jacobian", 2),
           ("neural_tangents", "jacobian", 3), ("neural_tangents", "jacobian", 0)]


def tiny_setup(tasks: int, n: int, num_probes: int = 8):
  """(f, peft params, x (tasks*n, 8, 8, 3)) for the tiny NTK-CL channel model on digits."""
  # lazy: scikit-learn is slow to import and only the digits inputs need it
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  cfg = vit.get_config("tiny", image_size=8, patch_size=2)
  spec = ntkcl.ModelSpec(cfg, method="channel", ffn_num=8, frozen_sets=0, section_weights=(1.0,))
  key = jax.random.PRNGKey(0)
  backbone = vit.init_params(cfg, key)
  peft = ntkcl.init_trainable(spec, key)["channel"]
  peft = jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), peft)
  model = spec.vit_module("channel")
  phi = lambda p, x: model.apply({"params": tree_utils.merge(backbone, p)}, x)
  f = readouts.feature_sketch(phi, readouts.sketch_probes(jax.random.PRNGKey(1), 64, num_probes))
  d = load_digits()
  x = np.repeat((d.images / 16.0)[..., None], 3, -1).astype(np.float32)
  x = np.concatenate([x[d.target // 2 == t][:n] for t in range(tasks)])
  return f, peft, x


def activation_setup(n: int = 16, tokens: int = 2048, width: int = 64, hidden: int = 512,
                     outputs: int = 8):
  """(f, params, x): a per-token MLP over `tokens` tokens, mean-pooled into `outputs` outputs;
  37K parameters but 4 MB of hidden activations per sample, so the Jacobian calls' activations
  and not the Jacobian panels dominate the memory (what a panels-only estimate misses)."""
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": jax.random.normal(k[0], (width, hidden)) / np.sqrt(width),
            "w2": jax.random.normal(k[1], (hidden, outputs)) / np.sqrt(hidden)}

  def f(p, x):
    return jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"], axis=1)
  return f, params, np.asarray(jax.random.normal(k[2], (n, tokens, width)))


MEMORY_CASES = {"activations": activation_setup, "tiny": lambda: tiny_setup(5, 16)}


def _status_kb(key: str) -> int:
  with open("/proc/self/status") as fh:
    return int(re.search(key + r":\s+(\d+)", fh.read()).group(1))


def _reset_peak() -> bool:
  """Resets the peak RSS (VmHWM) to the current RSS where Linux allows it."""
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")
    return True
  except OSError:
    return False


def _peak_growth(fn) -> tuple:
  """(fn(), bytes the peak RSS rose above the RSS before the call)."""
  if _reset_peak():
    before = _status_kb("VmRSS")
    out = fn()
    return out, (_status_kb("VmHWM") - before) * 1024
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  out = fn()
  return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def measure_memory(case: str, chunk=None, jac_batch=None) -> dict:
  """One kernel of MEMORY_CASES[case] on every device of this process, called twice: the estimate
  (kernel_memory.MemoryPlan) and the peak RSS each call added (the first also compiles)."""
  f, p, x = MEMORY_CASES[case]()
  prof = {}
  kernel_fn = kernels.ntk_fn(f, devices="all", profile=prof, chunk=chunk, jac_batch=jac_batch)
  _, first = _peak_growth(lambda: kernel_fn(p, x))
  t0 = time.time()
  _, second = _peak_growth(lambda: kernel_fn(p, x))
  return {"case": case, "devices": prof["devices"], "N": len(x), "P": prof["P_active"],
          "outputs": prof["outputs"], "chunk": prof["chunk"], "jac_batch": prof["jac_batch"],
          "estimate_bytes": prof["estimate_bytes"], "device_bytes": prof["device_bytes"],
          "device_activation_bytes": prof["device_activation_bytes"],
          "source": prof["device_bytes_source"], "scratch_bytes": prof["scratch_bytes"],
          "first_call_peak_growth": first, "second_call_peak_growth": second,
          "second_call_s": round(time.time() - t0, 2), "plan": prof["memory_plan"]}


def run_devices(tasks: int, n: int, chunk: int, contract: str = "auto") -> dict:
  """One joint kernel of the tiny setup (tasks*n images) on every device of this process: the
  first call (compiles), the median of three more, and the bytes brought to the host (Jacobian
  rows for the host contraction, kernel blocks for the device one)."""
  f, p, x = tiny_setup(tasks, n)
  prof = {}
  kernel_fn = kernels.ntk_fn(f, devices="all", chunk=chunk, profile=prof, contract=contract)
  t0 = time.time()
  k = np.asarray(kernel_fn(p, x))
  first = time.time() - t0
  times = []
  for _ in range(3):
    t0 = time.time()
    np.asarray(kernel_fn(p, x))
    times.append(time.time() - t0)
  return {"devices": prof["devices"], "N": len(x), "P": kernel_memory.num_params(p),
          "chunk": chunk, "jac_batch": prof["jac_batch"], "first_call_s": round(first, 2),
          "call_s": round(float(np.median(times)), 2), "trace": float(np.trace(k)),
          "contract": prof.get("contract", contract), "host_bytes": prof.get("host_bytes")}


def in_subprocess(devices: int, args: list) -> dict:
  """The JSON line `python -m benchmarks.ntk ARGS` prints with `devices` fake CPU
  devices (an error record where it fails)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-m", "benchmarks.ntk", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    return {"devices": devices, "error": out.stderr.strip()[-400:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def device_table(counts: list, tasks: int, n: int, chunk: int,
                 contracts=("auto",)) -> list:
  """Markdown rows: joint-kernel time and bytes brought to the host against the number of
  devices, per contraction (host: Jacobian rows to the host, float64 there; device: J J^T blocks
  where the Jacobians live, finished blocks to the host)."""
  rows = ["| contraction | devices | N | samples per device and call | first call s (compiles) | "
          "call s | speed-up | bytes to the host | trace |", "|---|---|---|---|---|---|---|---|---|"]
  for contract in contracts:
    base = None
    for d in counts:
      r = in_subprocess(d, ["--one_devices", "--tasks", str(tasks), "--n", str(n),
                            "--chunk", str(chunk), f"--contract={contract}"])
      if "error" in r:
        rows.append(f"| {contract} | {d} | error: {r['error'][-200:]} |||||||")
        continue
      base = base or r["call_s"]
      host = f"{r['host_bytes']:,}" if r.get("host_bytes") is not None else "n/a"
      rows.append(f"| {r['contract']} | {r['devices']} | {r['N']} | {r['jac_batch']} | "
                  f"{r['first_call_s']:.2f} | {r['call_s']:.2f} | {base / r['call_s']:.2f}x | "
                  f"{host} | {r['trace']:.6g} |")
  return rows


def memory_table(cases: list, counts: list) -> list:
  """Markdown rows: the kernel's memory estimate against the peak RSS a call added."""
  rows = ["| case | devices | N | P | estimate MB | measured peak growth MB (2nd call) | "
          "estimate / measured | per-device call MB (XLA) | of it activations MB |",
          "|---|---|---|---|---|---|---|---|---|"]
  mb = lambda b: b / 2**20
  for case in cases:
    for d in counts:
      r = in_subprocess(d, [f"--memory={case}"])
      if "error" in r:
        rows.append(f"| {case} | {d} | error: {r['error'][-200:]} |||||||")
        continue
      m = r["second_call_peak_growth"]
      rows.append(f"| {case} | {r['devices']} | {r['N']} | {r['P']} | "
                  f"{mb(r['estimate_bytes']):.1f} | {mb(m):.1f} | "
                  f"{r['estimate_bytes'] / max(m, 1):.2f} | {mb(r['device_bytes']):.1f} | "
                  f"{mb(r['device_activation_bytes']):.1f} |")
  return rows


def run_one(backend, method, impl, tasks, n, chunk):
  f, p, x = tiny_setup(tasks, n)
  if method == "sum_of_logits":  # a readout, computed by Jacobian contraction
    f, method = readouts.sum_of_logits(f), "jacobian"
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.time()
  k = kernels.ntk_fn(f, method=method, backend=backend, implementation=impl, chunk=chunk)(p, x)
  dt = time.time() - t0
  rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"backend": backend, "method": method, "implementation": impl, "N": len(x),
          "P": kernel_memory.num_params(p), "seconds": round(dt, 2), "chunk": chunk,
          "peak_rss_mb": round(rss1 / 1024, 1), "rss_growth_mb": round((rss1 - rss0) / 1024, 1),
          "shape": list(k.shape), "trace": float(k.trace()), "jax": jax.__version__}


def define_flags(fv) -> None:
  flags.DEFINE_integer("tasks", 5, "tasks T of the joint kernel", flag_values=fv)
  flags.DEFINE_integer("n", 64, "images per task", flag_values=fv)
  flags.DEFINE_integer("chunk", 16, "samples per Jacobian panel (kernels.ntk_fn chunk)",
                       flag_values=fv)
  flags.DEFINE_string("one", "", "one configuration backend:method:impl, printed as JSON",
                      flag_values=fv)
  flags.DEFINE_string("skip", "", "comma list of backend:method:impl to skip", flag_values=fv)
  flags.DEFINE_string("memory", "",
                      f"comma list of {sorted(MEMORY_CASES)}: print measure_memory as JSON "
                      "(one case), or with --device_counts a table", flag_values=fv)
  flags.DEFINE_string("device_counts", "",
                      "comma list of fake CPU device counts: a table, one subprocess each",
                      flag_values=fv)
  flags.DEFINE_list("contract", ["auto"], "kernels.ntk_fn contractions of the device table: "
                    "auto, host, device (comma list)", flag_values=fv)
  flags.DEFINE_bool("one_devices", False,
                    "internal: run_devices on this process's devices as JSON (what "
                    "--device_counts runs in each subprocess)", flag_values=fv)


def _main(fv) -> int:
  cases = [c for c in fv.memory.split(",") if c]
  if set(cases) - set(MEMORY_CASES):
    raise cli.InputError(f"--memory={fv.memory}: cases are {sorted(MEMORY_CASES)}")
  try:
    counts = [int(c) for c in fv.device_counts.split(",") if c]
  except ValueError as e:
    raise cli.InputError(f"--device_counts={fv.device_counts}: a comma list of whole "
                         "numbers") from e
  bad = set(fv.contract) - {"auto", "host", "device"}
  if bad:
    raise cli.InputError(f"--contract={','.join(fv.contract)}: each one of auto, host, device")
  if fv.one_devices:
    print(json.dumps(run_devices(fv.tasks, fv.n, fv.chunk, fv.contract[0])))
    return 0
  if counts:
    rows = (memory_table(cases, counts) if cases
            else device_table(counts, fv.tasks, fv.n, fv.chunk, fv.contract))
    print("\n".join(rows))
    return 0
  if cases:
    if len(cases) > 1:
      raise cli.InputError("several --memory cases need --device_counts")
    print(json.dumps(measure_memory(cases[0])))
    return 0
  if fv.one:
    b, m, i = fv.one.split(":")
    print(json.dumps(run_one(b, m, int(i), fv.tasks, fv.n, fv.chunk)))
    return 0
  for b, m, i in CONFIGS:
    if f"{b}:{m}:{i}" in fv.skip.split(","):
      continue
    out = subprocess.run([sys.executable, "-m", "benchmarks.ntk", "--one", f"{b}:{m}:{i}",
                          "--tasks", str(fv.tasks), "--n", str(fv.n), "--chunk", str(fv.chunk)],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else
          json.dumps({"config": f"{b}:{m}:{i}", "error": out.stderr.strip()[-400:]}), flush=True)
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
