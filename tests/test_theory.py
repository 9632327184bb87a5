"""scripts/theory.py: the arms each experiment needs, records that survive interruptions (skip,
refuse another config), (b)'s two zero-weight controls (fix_orth at dis_temp=0 trains
bit-identically to the official term at dis_temp=0), and the whole pipeline on tiny runs: train,
measure, record, delete checkpoints, rerun without training, page from the records alone, each
measured quantity against a second computation (dense jacrev Jacobians, explicit formulas) from
the kept checkpoints."""
import json
import os
import sys

import jax
import jax.flatten_util  # noqa: F401  (jax.flatten_util.ravel_pytree)
import numpy as np
import pytest

from ntk_analysis import judge, measure, metrics, readouts
from ntkcl_jax import cli, config_files
from ntkcl_jax.checkpoints import runs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for scripts.*
from scripts import grid, ntk_page, theory  # noqa: E402


def _tiny(**kw):
  """configs/tiny.py (synthetic, 3 tasks x 2 classes), one epoch of 2 steps per task."""
  c = config_files.load_config_file("configs/tiny.py")
  c.train.mesh_data = 1
  c.optim.epochs = 1
  c.data.max_per_class_train = 8
  for k, v in kw.items():
    node, leaf = theory._node(c, k)  # pylint: disable=protected-access
    node[leaf] = v
  return c


def test_plan_names_arms_by_what_they_change_and_merges_arms_equal_to_the_base():
  c = _tiny()
  arms = theory.plan(c, "abcdef", dis_temps=(1e-4, 1e-2), orth_weights=(1e-1,),
                     reg_temps=(0.0, 1e-3, 10.0), n_per_class=(4, 8))
  assert arms["base"] == ({}, measure.PARTS)  # dis 1e-4, reg 1e-3 and N=8 are the base
  assert set(arms) == {"base", "name=simplecil", "dis_temp=0", "dis_temp=0.01",
                       "dis_temp=0,fix_orth=True,variant=corrected",  # fix_orth's own control
                       "dis_temp=0.1,fix_orth=True,variant=corrected",
                       "max_per_class_train=4,epochs=2",
                       "max_per_class_train=4,name=simplecil,epochs=2",
                       "reg_temp=0", "reg_temp=10", "frozen_update=copy"}
  assert arms["dis_temp=0.1,fix_orth=True,variant=corrected"] == (
      {"method.dis_temp": 0.1, "method.variant": "corrected", "method.fix_orth": True},
      ("pairs",))
  # half the images per class: twice the epochs, the base's SGD steps per task
  assert arms["max_per_class_train=4,epochs=2"] == (
      {"data.max_per_class_train": 4, "optim.epochs": 2}, ("gap",))
  assert arms["name=simplecil"] == ({"method.name": "simplecil"}, ("gap",))
  assert arms["reg_temp=10"][1] == ("tasks",)
  # another switch set (but ignored) in the config is switched off in the fix_orth arm
  c.method.fix_fusion = True
  ov = theory.plan(c, "b", dis_temps=(1e-2,), orth_weights=(1e-2,))[
      "dis_temp=0.01,fix_fusion=False,fix_orth=True,variant=corrected"][0]
  assert ov["method.fix_fusion"] is False
  assert set(theory.plan(c, "d")) == {"base"}
  with pytest.raises(cli.InputError, match="stability bound"):
    theory.plan(c, "f", reg_temps=(0.0, 100.0))  # tiny: lr 0.05, momentum 0.9: bound 38


def test_records_are_reused_only_for_the_same_config_and_settings(tmp_path):
  c = theory.run_config(_tiny(), {"method.dis_temp": 0.0}, 3)
  assert c.seed == 3 and c.train.checkpoint_every_steps == 0 and c.train.keep_checkpoints >= 4
  path = theory.record_path(str(tmp_path), "dis_temp=0", 3)
  assert theory.existing_record(path, c, theory.SETTINGS, ("pairs",)) is None
  os.makedirs(os.path.dirname(path))
  rec = {"schema": theory.SCHEMA, "settings": dict(theory.SETTINGS), "parts": ["pairs"],
         "config": json.loads(c.to_json_best_effort())}
  with open(path, "w") as f:
    json.dump(rec, f)
  assert theory.existing_record(path, c, theory.SETTINGS, ("pairs",)) == rec
  c2 = c.copy_and_resolve_references()
  c2.train.keep_checkpoints = 99  # bookkeeping: the same run
  assert theory.existing_record(path, c2, theory.SETTINGS, ("pairs",)) == rec
  c2.method.reg_temp = 5.0
  with pytest.raises(cli.InputError, match="record of another config"):
    theory.existing_record(path, c2, theory.SETTINGS, ("pairs",))
  with pytest.raises(cli.InputError, match="measured with settings"):
    theory.existing_record(path, c, dict(theory.SETTINGS, n_per_task=4), ("pairs",))
  with pytest.raises(cli.InputError, match="checkpoints are gone"):
    theory.existing_record(path, c, theory.SETTINGS, ("pairs", "lazy"))


def _params_and_basis(workdir):
  _, _, state, meta = runs.load_run(workdir)
  return (jax.flatten_util.ravel_pytree(jax.device_get(
      {k: state[k] for k in ("params", "frozen", "prototypes")}))[0],
          np.asarray(state["orth_basis"]), meta["results"])


def test_fix_orth_at_zero_weight_trains_bit_identically_to_official(tmp_path):
  """(b)'s two kinds of arm share one control: at dis_temp=0 the corrected orthogonality term
  (with its own basis, which differs) changes no bit of training."""
  official = _tiny(**{"method.dis_temp": 0.0})
  fixed = _tiny(**{"method.dis_temp": 0.0, "method.variant": "corrected",
                   "method.fix_orth": True})
  out = []
  for name, c in (("official", official), ("fix_orth", fixed)):
    c.train.checkpoint_every_steps = 0
    grid.train_unless_finished(c, str(tmp_path / name), progress=False, log=lambda *_: None)
    out.append(_params_and_basis(str(tmp_path / name)))
  (p0, b0, r0), (p1, b1, r1) = out
  assert not np.array_equal(b0, b1)  # the switch is on: another basis is in use
  np.testing.assert_array_equal(p0, p1)
  assert r0["accuracy_matrix"] == r1["accuracy_matrix"]


# -- the pipeline on tiny runs -------------------------------------------------------------------
SWEEP = dict(reg_temps=(0.0,), n_per_class=(4, 8),
             settings={"n_per_task": 4, "probes": 2, "lin_test": 6})
# (b)'s arms measure only the pairs part, which the base run measures too: left out to keep the
# fixture to 6 runs (test_plan_names_arms... covers their plan)
EXPERIMENTS = "acdef"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A tiny sweep of experiments (a), (c)-(f) (seed 0, 6 runs: every measured part); the base
  run, trained first, keeps its checkpoints for the second computation."""
  root = str(tmp_path_factory.mktemp("theory"))
  config = _tiny()
  kept = theory.run_arm(config, root, "base", {}, 0, measure.PARTS,
                        settings=SWEEP["settings"], keep_checkpoints=True, log=lambda *_: None)
  recs = theory.run_all(config, root, (0,), EXPERIMENTS, spec="configs/tiny.py",
                        sweep_command="python -m scripts.theory --root=ROOT",
                        log=lambda *_: None, **SWEEP)
  return root, config, recs, kept


@pytest.mark.slow
def test_sweep_writes_small_records_deletes_checkpoints_and_reruns_without_training(
    sweep, monkeypatch):
  root, config, recs, kept = sweep
  arms = theory.plan(config, EXPERIMENTS,
                     **{k: v for k, v in SWEEP.items() if k != "settings"})
  assert [r["arm"] for r in recs] == list(arms) and len(arms) == 6
  for arm in arms:
    wd = os.path.dirname(theory.record_path(root, arm, 0))
    assert os.path.getsize(os.path.join(wd, "record.json")) < 60_000
    assert os.path.exists(os.path.join(wd, "checkpoints")) == (arm == "base")  # kept: base only
  assert recs[0] == json.loads(json.dumps(kept))  # read back, not trained again
  rec = next(r for r in recs if r["arm"] == "max_per_class_train=4,epochs=2")
  assert "--config.seed=0" in rec["command"] and "--config.data.max_per_class_train=4" in \
      rec["command"] and "--config.optim.epochs=2" in rec["command"]
  assert rec["parts"] == ["gap"] and len(rec["gap"]) == 3 and rec["planned_runs"] == 6
  assert rec["steps_per_task"] == kept["steps_per_task"]  # the same SGD steps at half the N
  assert rec["results"]["accuracy_matrix"] and rec["counts"]["train"] == [8, 8, 8]
  simple = next(r for r in recs if r["arm"] == "name=simplecil")
  assert "proxy_train_acc" not in simple["gap"][0] and "ncm_train_loo" in simple["gap"][0]

  def no_training(*a, **k):
    raise AssertionError("a run with a record was trained again")
  monkeypatch.setattr(grid, "train_unless_finished", no_training)
  again = theory.run_all(config, root, (0,), EXPERIMENTS, log=lambda *_: None, **SWEEP)
  assert [r["arm"] for r in again] == [r["arm"] for r in recs]
  rows = theory.run_all(config, root, (0, 1), "d", plan_only=True, **SWEEP)
  assert [(a, s, d) for a, s, _, d in rows] == [("base", 0, True), ("base", 1, False)]


@pytest.mark.slow
def test_page_from_the_records_alone(sweep, tmp_path):
  root = sweep[0]
  out = tmp_path / "docs" / "ntk.md"
  out.parent.mkdir()
  (out.parent / "ntk").mkdir()
  (out.parent / "ntk" / "stale.png").write_bytes(b"x")
  ntk_page.check_inputs([root], str(out))
  ntk_page.page([root], str(out))
  text = out.read_text()
  for k in "abcdef":
    assert f"### ({k}) " in text
  assert "Criterion (fixed before measuring)" in text and "(n=1, no interval)" in text
  assert "- Control: " in text and "### Compute" in text
  assert "**holds**" not in text.split("### Runs")[1]  # one seed: no verdict holds
  assert "random frozen backbone" in text
  assert "--config.seed={seed}" in text and "python -m scripts.theory --root=ROOT" in text
  tag = os.path.basename(root)
  assert os.path.exists(out.parent / "ntk" / f"{tag}_theory_a.png")
  assert not os.path.exists(out.parent / "ntk" / "stale.png")
  with pytest.raises(cli.InputError, match="no record.json"):
    ntk_page.check_inputs([str(tmp_path / "not_a_sweep")], str(out))


def test_page_of_a_sweep_with_no_record_states_every_criterion(tmp_path):
  """Before any run is read, the page gives each check's prediction, control and criterion and
  nothing measured."""
  root = tmp_path / "theory"
  root.mkdir()
  out = tmp_path / "ntk.md"
  ntk_page.check_inputs([str(root)], str(out))
  text = open(ntk_page.page([str(root)], str(out))).read()
  assert "No run of this sweep is recorded yet" in text and "### Runs" not in text
  for k in "abcdef":
    section = text.split(f"### ({k}) ")[1].split("### (")[0]
    assert "- Prediction: " in section and "- Control: " in section
    assert "Criterion (fixed before measuring)" in section and "Not measured yet" in section
  sweep_part = text.split("## Sweep")[1]
  assert "**holds**" not in sweep_part and "**fails**" not in sweep_part
  assert "nan" not in sweep_part  # the (f) bound, unknown without a base record


def test_compute_plan_extrapolates_the_recorded_runs_to_the_rest_of_the_sweep():
  """Two of ten planned runs took 1 h each: the other eight take about 8 h."""
  recs = [{"arm": a, "seed": 0, "planned_runs": 10, "train_seconds": 3000.0,
           "measure_seconds": 600.0} for a in ("base", "name=simplecil")]
  text = "\n".join(ntk_page.compute_section(judge.Sweep(recs)))
  assert "2 runs: 1.7 h of training and 0.3 h of measuring" in text
  assert "plan has 10 runs" in text and "8 still missing take about 8 h more" in text
  assert "still missing take" not in "\n".join(ntk_page.compute_section(judge.Sweep(recs[:1] * 10)))


def _dense_jacobian(f, params, x):
  """(N, O, P) Jacobian of f from jacrev over the flattened parameters."""
  v, unravel = jax.flatten_util.ravel_pytree(params)
  return np.asarray(jax.jacrev(lambda u: f(unravel(u), x))(v), np.float64)


def _dense_kernel(f, params, x):
  """Traced kernel (mean over outputs) from a dense jacrev Jacobian."""
  j = _dense_jacobian(f, params, x)
  return np.einsum("iop,jop->ij", j, j) / j.shape[1]


def _rho(k, a, b):
  return metrics.frob(k[a, b]) / np.sqrt(metrics.frob(k[a, a]) * metrics.frob(k[b, b]))


@pytest.mark.slow
def test_measured_quantities_against_a_second_computation(sweep):
  """From the kept checkpoints of seed 0's base run: rho, the centred rho and the interference
  term at theta_tau^0, the drift over every adapted parameter, the trace-normalised stacked-view
  rank, the lazy check's S and e_lin and the group shares, recomputed with dense jacrev
  Jacobians and explicit formulas."""
  _, _, _, rec = sweep
  wd = os.path.dirname(theory.record_path(sweep[0], "base", 0))
  run = measure.Run(wd, rec["n_per_task"], rec["probes"])
  n, x, probe = run.n, run.x, run.probe
  r = lambda t: slice(t * n, (t + 1) * n)  # noqa: E731
  for p in rec["pairs"]:
    s0 = run.start(p["t"])
    k = _dense_kernel(*readouts.model_readout(run.learner, s0, "fused", probe), x)
    assert p["rho"] == pytest.approx(_rho(k, r(p["s"]), r(p["t"])), rel=2e-3, abs=1e-6)
    h = np.eye(len(k)) - 1.0 / len(k)
    assert p["rho_centred"] == pytest.approx(_rho(h @ k @ h, r(p["s"]), r(p["t"])), rel=2e-3,
                                             abs=1e-6)
    # the interference term: J_f(X_s) J_l(X_t)^T (J_l J_l^T + lambda I)^-1 R_t, dense
    classes = run.classes(p["t"])
    f, params = measure.mixed_readout(run.learner, s0, probe, len(classes))
    j = _dense_jacobian(f, params, x)  # (N, R + V n_new, P)
    rr = probe.shape[1]
    jf = j[r(p["s"]), :rr].reshape(-1, j.shape[-1])
    jl = j[r(p["t"]), rr:].reshape(-1, j.shape[-1])
    out = np.asarray(f(params, x), np.float64)[r(p["t"]), rr:]
    resid = measure._ce_residual(out, np.searchsorted(classes, run.y[r(p["t"])]), len(classes))  # pylint: disable=protected-access
    kll = jl @ jl.T
    lam = measure.RIDGE * np.trace(kll) / len(kll)
    d = jf @ jl.T @ np.linalg.solve(kll + lam * np.eye(len(kll)), resid.reshape(-1))
    assert p["interference"] == pytest.approx(np.sum(d ** 2) / n, rel=1e-2, abs=1e-9)
  # old-task drift over every adapted parameter (the frozen sets included)
  ks = [_dense_kernel(*measure.adapted_readout(run.learner, s, probe), x) for s in run.states]
  a, b = ks[0][r(0), r(0)], ks[-1][r(0), r(0)]
  assert rec["tasks"][0]["drift_S"] == pytest.approx(
      1 - (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)), abs=1e-5)
  # stacked views of the last task: each view's tangent features centred over the samples,
  # then each view's (n, n) block at unit trace
  f_all, p_all = readouts.model_readout(run.learner, run.states[-1], "all", probe)
  t_last = run.T - 1
  j = _dense_jacobian(f_all, p_all, x[r(t_last)]).reshape(n, 3, -1, len(
      jax.flatten_util.ravel_pytree(p_all)[0]))
  j = j - j.mean(0, keepdims=True)
  blocks = np.einsum("avop,bwop->avbw", j, j) / j.shape[2]  # (n, 3, n, 3)
  tr = np.array([np.trace(blocks[:, v, :, v]) for v in range(3)])
  big = (blocks / np.sqrt(np.outer(tr, tr))[None, :, None, :]).reshape(3 * n, 3 * n)
  want = metrics.effective_rank(big)
  assert rec["views"][t_last]["r_eff_stacked"] == pytest.approx(want, rel=2e-3)
  # lazy check of task 1: S between theta_1^0 and theta_1 (the frozen sets of theta_1^0)
  s0 = run.start(1)
  s1 = dict(s0, params=run.states[1]["params"])
  f0, p0 = readouts.model_readout(run.learner, s0, "fused", probe)
  _, p1 = readouts.model_readout(run.learner, s1, "fused", probe)
  lazy = rec["lazy"][1]
  assert lazy["S"] == pytest.approx(metrics.kernel_distance(_dense_kernel(f0, p0, x),
                                                            _dense_kernel(f0, p1, x)),
                                    rel=1e-2, abs=1e-6)
  assert 0 <= lazy["agreement"] <= 1
  shares = rec["groups"]
  assert np.isclose(sum(g["param_share"] for g in shares.values()), 1.0)
  assert np.isclose(sum(g["trace_share"] for g in shares.values()), 1.0)
  assert all(v > 0 for v in rec["grad_scale"].values())
  # the same kernel at theta_T through neural-tangents (the full readout: fusion, patch prompts,
  # frozen set), against the JAX backend's kernel
  nt = rec["nt_check"]
  assert nt["n"] == len(x) and nt["implementation"] == 1 and nt["max_rel_error"] < 1e-5


def test_unknown_override_names_the_key():
  with pytest.raises(KeyError, match="no such config key"):
    theory.run_config(_tiny(), {"method.not_a_key": 1}, 0)
