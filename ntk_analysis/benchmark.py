"""Time and peak memory of one joint kernel (T tasks x n images) at the tiny config, per backend.

    python -m ntk_analysis.benchmark --tasks 5 --n 64      # one subprocess per configuration

Model: tiny ViT (D=64, depth 4, 4 heads, patch 2 on 8x8 sklearn digits) with NTK-CL channel
adapters (r=8), a random frozen backbone, feature-sketch readout R=8 (docs/ntk_theory.md §4 "Tiny setting").
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import numpy as np

from ntk_analysis import kernels, readouts
from ntkcl_jax import tree_utils
from ntkcl_jax.models import ntkcl, vit

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
          "P": kernels.num_params(p), "seconds": round(dt, 2), "chunk": chunk,
          "peak_rss_mb": round(rss1 / 1024, 1), "rss_growth_mb": round((rss1 - rss0) / 1024, 1),
          "shape": list(k.shape), "trace": float(k.trace()), "jax": jax.__version__}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tasks", type=int, default=5)
  ap.add_argument("--n", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--one", default="")
  ap.add_argument("--skip", default="", help="comma list of backend:method:impl to skip")
  a = ap.parse_args()
  if a.one:
    b, m, i = a.one.split(":")
    print(json.dumps(run_one(b, m, int(i), a.tasks, a.n, a.chunk)))
    return
  for b, m, i in CONFIGS:
    if f"{b}:{m}:{i}" in a.skip.split(","):
      continue
    out = subprocess.run([sys.executable, "-m", "ntk_analysis.benchmark", "--one", f"{b}:{m}:{i}",
                          "--tasks", str(a.tasks), "--n", str(a.n), "--chunk", str(a.chunk)],
                         capture_output=True, text=True, check=False)
    print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else
          json.dumps({"config": f"{b}:{m}:{i}", "error": out.stderr.strip()[-400:]}), flush=True)


if __name__ == "__main__":
  main()
