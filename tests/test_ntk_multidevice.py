"""Kernels over several devices and processes (kernels.device_mesh): the Jacobian calls split
their samples over 8 fake CPU devices (or 3, 4, 6: any sample count), or over two processes
(jax.distributed on localhost), and give the one-device kernel, whether J J^T is contracted on
the host (each process a share of the rows) or on the devices (kernel blocks only reach the
host); the device contraction's float32 Kahan sums match the float64 host contraction; the
memory estimate counts the calls' activations and bounds the measured peak, on both paths."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.*

from benchmarks import ntk as benchmark  # noqa: E402
from ntk_analysis import kernel_memory, kernels, readouts  # noqa: E402
import _ntk_models  # noqa: E402
import _xla  # tests/_xla.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readout():
  """A feature-sketch readout (3 probes) of the tiny ViT with NTK-CL channel adapters."""
  make_f, peft, x = _ntk_models.tiny_vit_adapter()
  return readouts.feature_sketch(make_f(), readouts.probes(5, 3, seed=0)), peft, np.asarray(x)


CASES = {"joint": {}, "chunked": {"chunk": 4}, "full": {"trace": False},
         "full_chunked": {"trace": False, "chunk": 4}}
CONTRACTS = ("host", "device")
_ONE = {}


def _kernels(devices, contract="host", x=None):
  """{case: kernel} of the readout on `devices` (joint, chunked, untraced, and against x2), J J^T
  contracted on the host or the devices; x: the inputs (None: the readout's 6)."""
  f, p, x0 = _readout()
  x = x0 if x is None else x
  out = {name: kernels.empirical_ntk(f, p, x, devices=devices, contract=contract, **kw)
         for name, kw in CASES.items()}
  out["x2"] = kernels.empirical_ntk(f, p, x, x[:3] + 0.1, devices=devices, chunk=2,
                                    contract=contract)
  out["x2_full"] = kernels.empirical_ntk(f, p, x, x[:5] + 0.1, devices=devices, chunk=3,
                                         trace=False, contract=contract)
  return out


def _one_device(n=6):
  """The one-device host-contracted kernels of the readout's first n inputs (7: + one more)."""
  if n not in _ONE:
    _ONE[n] = _kernels(None, x=_inputs(n))
  return _ONE[n]


def _inputs(n):
  """n inputs: the readout's 6, then halved copies of them."""
  _, _, x = _readout()
  return np.concatenate([x, 0.5 * x])[:n]


def _assert_equal_kernels(got, want, what):
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5,
                               atol=1e-5 * np.abs(want[name]).max(), err_msg=f"{what} {name}")


@pytest.mark.parametrize("contract", CONTRACTS)
def test_eight_devices_equal_one_device(contract):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  one, eight = _one_device(), _kernels("all", contract)
  prof = {}
  f, p, x = _readout()
  kernels.empirical_ntk(f, p, x, devices="all", profile=prof, contract=contract)
  assert prof["devices"] == 8 and prof["jac_batch"] == 1  # 6 samples: one per device and call
  assert prof["contract"] == contract
  _assert_equal_kernels(eight, one, f"8 devices, {contract}")
  np.testing.assert_allclose(eight["joint"], eight["joint"].T, rtol=1e-6)
  if contract == "device":
    _assert_equal_kernels(_kernels(None, "device"), one, "1 device, device")


@pytest.mark.parametrize("devices", [3, 4, 6])
def test_any_sample_count_on_any_device_count(devices):
  """7 samples (and 3 and 5 against them) on 3, 4, 6 devices: the last call of each panel is
  padded and its rows dropped; both contractions and the NTK-vector products give the one-device
  kernel."""
  x = _inputs(7)
  one = _one_device(7)
  devs = jax.devices()[:devices]
  for contract in CONTRACTS:
    _assert_equal_kernels(_kernels(devs, contract, x), one, f"{devices} devices, {contract}")
  f, p, _ = _readout()
  prof = {}
  k = kernels.empirical_ntk(f, p, x, x[:5] + 0.1, method="ntvp", devices=devs, profile=prof)
  assert prof["devices"] == devices and prof["ntvp_columns_per_call"] == devices
  np.testing.assert_allclose(k, np.einsum("abii->ab", one["x2_full"]) / 3, rtol=1e-5,
                             atol=1e-5 * np.abs(k).max())


def test_bytes_to_host_are_rows_on_the_host_path_and_blocks_on_the_device_path():
  """Per kernel of the 6 samples (3 outputs, 296 parameters): the host path brings every
  Jacobian row of each call (padded to whole calls), the device path only the kernel block."""
  f, p, x = _readout()
  for devices, step in ((None, 4), ("all", 8)):  # samples per call over every device
    host, dev = {}, {}
    k_host = kernels.empirical_ntk(f, p, x, devices=devices, profile=host, contract="host")
    k_dev = kernels.empirical_ntk(f, p, x, devices=devices, profile=dev, contract="device")
    calls = -(-len(x) // step)
    assert host["host_bytes"] == host["host_bytes_rows"] == calls * step * 3 * 296 * 4
    assert dev["host_bytes"] == dev["host_bytes_blocks"] == (calls * step) ** 2 * 4
    assert dev["host_bytes_rows"] == 0 and host["host_bytes_blocks"] == 0
    assert host["kernel_s"] > 0 and dev["kernel_s"] > 0
    np.testing.assert_allclose(k_dev, k_host, rtol=1e-5, atol=1e-6 * np.abs(k_host).max())


def _wide_mlp():
  """(f, params, x): a 2-layer tanh MLP with 133K parameters and 4 outputs, 12 samples."""
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  p = {"w1": jax.random.normal(k[0], (256, 512)) / 16.0,
       "w2": jax.random.normal(k[1], (512, 4)) / np.sqrt(512)}
  x = np.asarray(jax.random.normal(k[2], (12, 256)))
  return (lambda q, y: jnp.tanh(y @ q["w1"]) @ q["w2"]), p, x


def test_device_contraction_matches_the_float64_host_contraction():
  """The device path (float32 products over slices of 1024 parameters, the slices' sums
  Kahan-compensated) against the host path (float32 slices summed in float64): 133K parameters
  in 131 slices over 4 devices, traced and untraced. Tolerance: relative Frobenius error <= 3e-7
  and largest entry error <= 1e-6 of the largest entry (measured 1.1e-7 and 1.7e-7 traced,
  1.2e-7 and 3.3e-7 untraced); against float64 Jacobians (x64) the device path is no further
  than twice the host path's own error (the host path: 8e-8 and 1.1e-7, relative Frobenius)."""
  f, p, x = _wide_mlp()
  devs = jax.devices()[:4]
  err = lambda k, ref: (np.linalg.norm(k - ref) / np.linalg.norm(ref),
                        np.abs(k - ref).max() / np.abs(ref).max())
  for trace in (True, False):
    ref = kernels.empirical_ntk(f, p, x, trace=trace, chunk=8, devices=devs, contract="host")
    got = kernels.empirical_ntk(f, p, x, trace=trace, chunk=8, devices=devs, contract="device")
    with jax.enable_x64(True):
      exact = kernels.empirical_ntk(f, p, x, trace=trace, chunk=8, dtype=np.float64)
    fro, top = err(got, ref)
    print(f"trace={trace}: device vs host relative Frobenius {fro:.2e}, max {top:.2e}; vs "
          f"float64 Jacobians: device {err(got, exact)[0]:.2e}, host {err(ref, exact)[0]:.2e}")
    assert fro <= 3e-7 and top <= 1e-6, (fro, top)
    assert err(got, exact)[0] <= 2 * err(ref, exact)[0] + 1e-8


def _worker(coordinator, process_id, out):
  """One of two processes: every process computes the kernels over all 8 devices, both
  contractions, and profiles one joint kernel of each."""
  jax.distributed.initialize(coordinator, 2, process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  res = {}
  f, p, x = _readout()
  for contract in CONTRACTS:
    res.update({f"{contract}/{k}": v for k, v in _kernels("all", contract).items()})
    prof = {}
    kernels.empirical_ntk(f, p, x, devices="all", contract=contract, profile=prof)
    res[f"{contract}/host_bytes"] = np.asarray(
        [prof["host_bytes"], prof["host_bytes_rows"], prof["host_bytes_blocks"]])
  np.savez(out, **res)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS=_xla.flags(4),
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), f"localhost:{port}",
                             str(i), str(tmp_path / f"k{i}.npz")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  one = _one_device()
  for i in range(2):  # every process ends with the whole kernel
    with np.load(tmp_path / f"k{i}.npz") as got:
      for contract in CONTRACTS:
        _assert_equal_kernels({k: got[f"{contract}/{k}"] for k in one}, one,
                              f"process {i}, {contract}")
      # host path: every row of one call of 8 samples (plus the processes' kernel parts);
      # device path: the 8 x 8 block only
      rows = 8 * 3 * 296 * 4
      assert list(got["host/host_bytes"]) == [rows + 2 * 6 * 6 * 8, rows, 2 * 6 * 6 * 8]
      assert list(got["device/host_bytes"]) == [8 * 8 * 4, 0, 8 * 8 * 4]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_memory_estimate_bounds_the_measured_peak_device_contraction(devices):
  """The same activation-heavy kernel contracted on the (CPU) devices: the estimate (per device
  its panels, contraction buffers and call, times the local devices, plus the kernel and the
  gathered blocks on the host) is at least the measured peak growth, and within 3x of it; and
  the estimate of the contraction's buffers bounds XLA's own count of them (its temporaries and
  output; its arguments are the panels)."""
  p = subprocess.run([sys.executable, os.path.abspath(__file__), "memory", "device"], cwd=ROOT,
                     capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu",
                              PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
                              XLA_FLAGS=_xla.flags(devices)))
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["devices"] == devices and r["contract"] == "device"
  measured = r["second_call_peak_growth"]
  assert measured <= r["estimate_bytes"] <= 3 * measured, r
  assert r["device_contract_bytes_xla"] <= r["device_contract_bytes"]


def _measure_memory(contract):
  """benchmark.measure_memory of the activation case with J J^T contracted per `contract`: the
  estimate, the device estimate's parts and the peak RSS growth of a call after the first, the
  smaller of two (a call now and then lands on fresh pages of a fragmented heap: tens of MB)."""
  f, p, x = benchmark.activation_setup()
  prof = {}
  kernel_fn = kernels.ntk_fn(f, devices="all", profile=prof, contract=contract)
  growth = [benchmark._peak_growth(lambda: kernel_fn(p, x))[1]  # pylint: disable=protected-access
            for _ in range(3)]
  keys = ("devices", "contract", "chunk", "estimate_bytes", "device_panel_bytes",
          "device_contract_bytes", "device_contract_bytes_xla", "device_total_bytes",
          "memory_plan")
  return dict({k: prof.get(k) for k in keys}, second_call_peak_growth=min(growth[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_memory_estimate_bounds_the_measured_peak(devices):
  """An activation-heavy readout (37K parameters, 4 MB of activations per sample): the estimate
  (per device: XLA's arguments + activations + output; host: panels + kernel + every local
  device's call + the gathered output) is at least the peak RSS a compiled kernel call adds,
  and within 2x of it. Compilation's own memory is not part of the estimate."""
  p = subprocess.run([sys.executable, "-m", "benchmarks.ntk", "--memory=activations"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu",
                              XLA_FLAGS=_xla.flags(devices)))
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
  CPU devices and contraction, the same joint kernel in each (equal traces), the samples split
  over the devices, and the device contraction bringing fewer bytes to the host."""
  rows = benchmark.device_table([1, 4], tasks=2, n=4, chunk=4, contracts=("host", "device"))
  assert len(rows) == 6 and "error" not in "".join(rows), rows
  cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
  assert [c[0] for c in cells] == ["host", "host", "device", "device"]
  assert [c[1] for c in cells] == ["1", "4", "1", "4"] and {c[2] for c in cells} == {"8"}
  assert int(cells[1][3]) < int(cells[0][3])  # fewer samples per device and Jacobian call
  traces = [float(c[8]) for c in cells]
  np.testing.assert_allclose(traces, traces[0], rtol=1e-5)
  host_bytes = [int(c[7].replace(",", "")) for c in cells]
  assert max(host_bytes[2:]) < min(host_bytes[:2])


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
  if sys.argv[1] == "memory":
    print(json.dumps(_measure_memory(sys.argv[2])))
  else:
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
