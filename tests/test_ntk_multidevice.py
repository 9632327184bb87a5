"""Kernels over several devices and processes (kernels.device_mesh): the Jacobian calls split
their samples over 8 fake CPU devices, or over two processes (jax.distributed on localhost) that
each contract a share of the rows, and give the one-device kernel; the memory estimate counts
the calls' activations and bounds the measured peak."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from ntk_analysis import benchmark, kernel_memory, kernels, readouts
import _ntk_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readout():
  """A feature-sketch readout (3 probes) of the tiny ViT with NTK-CL channel adapters."""
  make_f, peft, x = _ntk_models.tiny_vit_adapter()
  return readouts.feature_sketch(make_f(), readouts.probes(5, 3, seed=0)), peft, np.asarray(x)


CASES = {"joint": {}, "chunked": {"chunk": 4}, "full": {"trace": False}}


def _kernels(devices):
  """{case: kernel} of the readout on `devices` (joint, chunked, untraced, and against x2)."""
  f, p, x = _readout()
  out = {name: kernels.empirical_ntk(f, p, x, devices=devices, **kw) for name, kw in CASES.items()}
  out["x2"] = kernels.empirical_ntk(f, p, x, x[:3] + 0.1, devices=devices, chunk=2)
  return out


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  one, eight = _kernels(None), _kernels("all")
  prof = {}
  f, p, x = _readout()
  kernels.empirical_ntk(f, p, x, devices="all", profile=prof)
  assert prof["devices"] == 8 and prof["jac_batch"] == 1  # 6 samples: one per device and call
  for name in one:
    np.testing.assert_allclose(eight[name], one[name], rtol=1e-5,
                               atol=1e-5 * np.abs(one[name]).max(), err_msg=name)
  np.testing.assert_allclose(eight["joint"], eight["joint"].T, rtol=1e-6)


def _worker(coordinator, process_id, out):
  """One of two processes: every process computes the kernels over all 8 devices."""
  jax.distributed.initialize(coordinator, 2, process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  np.savez(out, **_kernels("all"))


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"localhost:{port}",
                             str(i), str(tmp_path / f"k{i}.npz")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  one = _kernels(None)
  for i in range(2):  # every process ends with the whole kernel
    with np.load(tmp_path / f"k{i}.npz") as got:
      for name in one:
        np.testing.assert_allclose(got[name], one[name], rtol=1e-5,
                                   atol=1e-5 * np.abs(one[name]).max(), err_msg=f"{i} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_memory_estimate_bounds_the_measured_peak(devices):
  """An activation-heavy readout (37K parameters, 4 MB of activations per sample): the estimate
  (per device: XLA's arguments + activations + output; host: panels + kernel + every local
  device's call + the gathered output) is at least the peak RSS a compiled kernel call adds,
  and within 2x of it. Compilation's own memory is not part of the estimate."""
  p = subprocess.run([sys.executable, "-m", "ntk_analysis.benchmark", "--memory=activations"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu",
                              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["devices"] == devices and r["source"] == "xla"
  panels = r["N"] * r["outputs"] * r["P"] * 4
  assert r["device_activation_bytes"] > panels  # activations, not panels, dominate here
  measured = r["second_call_peak_growth"]
  assert measured <= r["estimate_bytes"] <= 2 * measured, r


@pytest.mark.slow
def test_device_count_benchmark_rows_agree():
  """The benchmark's device-count table (docs/benchmarks.md): one subprocess per count of fake
  CPU devices, the same joint kernel in each (equal traces), the samples split over the devices."""
  rows = benchmark.device_table([1, 4], tasks=2, n=4, chunk=4)
  assert len(rows) == 4 and "error" not in "".join(rows), rows
  cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
  assert [c[0] for c in cells] == ["1", "4"] and [c[1] for c in cells] == ["8", "8"]
  assert int(cells[1][2]) < int(cells[0][2])  # fewer samples per device and Jacobian call
  np.testing.assert_allclose(float(cells[0][6]), float(cells[1][6]), rtol=1e-5)


def test_formula_bounds_xla_activations():
  """Where XLA reports no memory_analysis the formula stands in: on the activation-heavy case
  it is at least XLA's own count of the temporaries, and within 4x."""
  f, p, x = benchmark.activation_setup(n=4)
  prof = {}
  kernels.empirical_ntk(f, p, x, profile=prof)
  b, o = prof["jac_batch"], prof["outputs"]
  formula = kernel_memory.call_memory_formula(f, p, x[:1], b, o, prof["P_active"], 4, 0)
  assert prof["device_activation_bytes"] <= formula.temp <= 4 * prof["device_activation_bytes"]
  assert formula.output == b * o * prof["P_active"] * 4


if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
