"""ntk_analysis.experiments (a)-(f) against closed forms on constructed runs, and against a second
computation path on a real tiny run trained by the sweep driver scripts/theory.py (training-time
evaluation; naive jacrev e_lin and task-end kernels)."""
import json
import os
import sys

import jax
import jax.flatten_util  # noqa: F401  (jax.flatten_util.ravel_pytree)
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_analysis import analyse, experiments, joint, metrics, readouts
from ntkcl_jax import config_files, data
from ntkcl_jax.checkpoints import runs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for scripts.*
from scripts import theory  # noqa: E402


# -- constructed runs: closed forms ------------------------------------------------------------
def _fake_run(root, name, acc, kernels, seed=0, method="ntkcl", n_per_class=8):
  """A workdir with results.json and task-end kernels (joint.task_end_path) from given kernels."""
  wd = os.path.join(root, name)
  t_count = len(acc)
  for t, k in enumerate(kernels):
    path = joint.task_end_path(wd, t)
    os.makedirs(os.path.dirname(path))
    n = k.shape[0] // t_count
    joint.JointKernel(k=k, task_index=np.repeat(np.arange(t_count), n),
                      indices={s: np.arange(n) for s in range(t_count)}, meta={}).save(path)
  a = np.array(acc, float)
  res = {"accuracy_matrix": acc, "avg_incremental_accuracy": 50.0,
         "last_accuracy": float(np.nanmean(a[-1])),
         "forgetting": float(np.mean([np.nanmax(a[:-1, s]) - a[-1, s] for s in range(t_count - 1)])),
         "config": {"seed": seed, "method": {"name": method},
                    "data": {"max_per_class_train": n_per_class}}}
  with open(os.path.join(wd, "results.json"), "w") as f:
    json.dump(res, f)
  return wd


def _two_task_kernel(c, n=3, scale=1.0):
  """[[I, cI], [cI, I]] * scale: rho_01 = c exactly (||cI|| / sqrt(||I|| ||I||))."""
  e = np.eye(n)
  return scale * np.block([[e, c * e], [c * e, e]])


ACC2 = [[90.0, float("nan")], [70.0, 80.0]]


def test_orthogonality_table_matches_closed_form(tmp_path):
  runs_ = {}
  for d, c in ((0.0, 0.5), (1e-4, 0.4), (1e-3, 0.2)):
    k = _two_task_kernel(c)
    wd = _fake_run(str(tmp_path), f"d{d}", ACC2, [k, k])
    runs_[wd] = {"method.dis_temp": d}
  res = experiments.orthogonality(runs_, str(tmp_path / "b.png"))
  rho = {r["dis_temp"]: r["mean_rho"] for r in res["table"]}
  np.testing.assert_allclose([rho[0.0], rho[1e-4], rho[1e-3]], [0.5, 0.4, 0.2], atol=1e-12)
  assert res["holds"] is True and "mean rho by -0.3 " in res["measured"]
  assert os.path.exists(tmp_path / "b.png")


def test_regularisation_ema_drift_and_u_shape(tmp_path):
  runs_ = {}
  n = 3
  for ema in (1, 0):
    for r, last in ((0.0, 40.0), (1e-3, 60.0), (1e-2, 50.0)):
      # task-0 kernel at theta_0 is I; at theta_T it is diag(1, 1, 1 + b): S is known in closed form
      b = 0.0 if ema else 1.0
      k0 = _two_task_kernel(0.1, n)
      k1 = k0.copy()
      k1[n - 1, n - 1] += b
      acc = [[90.0, float("nan")], [last, last]]
      wd = _fake_run(str(tmp_path), f"r{r}_e{ema}", acc, [k0, k1])
      runs_[wd] = {"method.reg_temp": r, "method.frozen_sets": ema}
  res = experiments.regularisation_ema(runs_, str(tmp_path / "f.png"))
  a, b = np.eye(n), np.diag([1.0, 1.0, 2.0])
  expected = 1 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
  drift = {(r["ema_sets"], r["reg_temp"]): r["old_kernel_drift"] for r in res["table"]}
  assert drift[(1, 1e-3)] == pytest.approx(0.0, abs=1e-12)
  assert drift[(0, 1e-3)] == pytest.approx(expected, rel=1e-9)
  assert res["holds"] is True  # interior best reg_temp and less drift with EMA


def test_overlap_vs_forgetting_rank_correlation(tmp_path):
  """Three tasks; the pair with more overlap at theta_t^0 loses more: Spearman = 1."""
  n = 2
  e = np.eye(n)
  k = np.block([[e, 0.1 * e, 0.6 * e], [0.1 * e, e, 0.3 * e], [0.6 * e, 0.3 * e, e]])
  # drops: (0<-1) 2, (0<-2) 20, (1<-2) 10 ; rho: 0.1, 0.6, 0.3
  acc = [[90.0, np.nan, np.nan], [88.0, 80.0, np.nan], [68.0, 70.0, 75.0]]
  wd = _fake_run(str(tmp_path), "a", acc, [k, k, k])
  res = experiments.overlap_vs_forgetting([wd])
  tab = {(r["s"], r["t"]): r for r in res["table"]}
  assert tab[(0, 2)]["rho"] == pytest.approx(0.6)
  assert tab[(0, 2)]["accuracy_drop"] == pytest.approx(20.0)
  assert "Spearman(rho, drop) = 1.00" in res["measured"] and res["holds"] is True


def test_slope_is_minus_half_for_inverse_sqrt():
  n = np.array([4.0, 16.0, 64.0])
  assert metrics.loglog_slope(n, 3.0 / np.sqrt(n)) == pytest.approx(-0.5)


def test_run_name_and_unknown_override(tmp_path):
  assert theory.run_name({"method.reg_temp": 0.001, "method.frozen_sets": 0}, 2) == \
      "frozen_sets=0_reg_temp=0.001_seed2"
  config = config_files.load_config_file(os.path.join(config_files.REPO_ROOT, "configs", "tiny.py"))
  with pytest.raises(KeyError, match="no such config key"):
    theory.train_run(config, str(tmp_path), {"method.not_a_key": 1}, 0)


# -- a real tiny run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lazy_run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("theory"))
  config = config_files.load_config_file(os.path.join(config_files.REPO_ROOT, "configs", "tiny.py"))
  config.train.mesh_data = 1
  config.optim.epochs = 1
  wd = theory.train_run(config, root, {"train.checkpoint_every_steps": 1}, 0, n_per_task=4,
                        extra_train={"train.keep_checkpoints": 1000}, log=lambda *_: None)
  return wd


@pytest.mark.slow
def test_split_accuracies_match_training_time_evaluation(lazy_run):
  """The post-hoc test accuracy per task equals the last row the learner wrote while training."""
  df = experiments.split_accuracies(lazy_run)
  last_row = experiments.results(lazy_run)["accuracy_matrix"][-1]
  np.testing.assert_allclose(df["test_acc"], last_row, atol=1e-9)
  np.testing.assert_allclose(df["gap"], df["train_acc"] - df["test_acc"])


@pytest.mark.slow
def test_lazy_regime_against_naive_jacobian(lazy_run):
  res = experiments.lazy_regime(analyse.every_checkpoint(lazy_run, n_per_task=2, num_probes=2))
  df = __import__("pandas").DataFrame(res["table"])
  first = df.groupby("task")["step"].transform("min") == df["step"]
  np.testing.assert_allclose(df[first]["S_to_task_start"], 0.0, atol=1e-12)
  # e_lin of one within-task pair, recomputed with a dense jacrev Jacobian
  row = df[~first & df["e_lin"].notna()].iloc[0]
  ids = list(df["checkpoint"])
  a, b = int(ids[ids.index(row["checkpoint"]) - 1]), int(row["checkpoint"])
  _, learner, s0, _ = runs.load_run(lazy_run, a)
  config, _, s1, _ = runs.load_run(lazy_run, b)
  images, _ = analyse.task_data(data.build_stream(config))
  x = np.concatenate([images[t][joint.subset_indices(0, t, len(images[t]), 2)]
                      for t in sorted(images)])
  probe = readouts.probes(learner.spec.feature_dim, 2)
  f, p0 = readouts.model_readout(learner, s0, "fused", probe)
  _, p1 = readouts.model_readout(learner, s1, "fused", probe)  # the same (non-inert) leaves
  flat0, unravel = jax.flatten_util.ravel_pytree(p0)
  flat1, _ = jax.flatten_util.ravel_pytree(p1)
  g = lambda v: f(unravel(v), x).ravel()  # noqa: E731
  jac = jax.jacrev(g)(flat0)
  lin = g(flat0) + jac @ (flat1 - flat0)
  want = float(jnp.linalg.norm(g(flat1) - lin) / jnp.linalg.norm(g(flat1) - g(flat0)))
  assert row["e_lin"] == pytest.approx(want, rel=1e-3, abs=1e-6)
  # S to the task-start kernel, recomputed from dense jacrev kernels (sum over outputs)
  ref = int(df[df["task"] == row["task"]]["checkpoint"].min())
  _, learner_r, s_r, _ = runs.load_run(lazy_run, ref)
  want_s = metrics.kernel_distance(_dense_kernel(learner_r, s_r, probe, x),
                                   _dense_kernel(learner, s1, probe, x))
  assert row["S_to_task_start"] == pytest.approx(want_s, rel=1e-3, abs=1e-7)


def _dense_kernel(lrn, state, probe, x):
  """The traced feature-sketch kernel from a dense jacrev Jacobian (mean over outputs)."""
  fk, pk = readouts.model_readout(lrn, state, "fused", probe)
  v, unr = jax.flatten_util.ravel_pytree(pk)
  j = jax.jacrev(lambda u: fk(unr(u), x))(v)  # (N, O, P)
  return np.einsum("iop,jop->ij", j, j) / j.shape[1]


@pytest.mark.slow
def test_task_end_kernels_from_the_saved_task_end_checkpoints(lazy_run):
  """The sweep driver computed one kernel per task end: each from the first checkpoint saved
  after that task's evaluation, equal to a dense jacrev kernel of that state."""
  ends = analyse.task_end_checkpoints(lazy_run)
  config, learner, _, _ = runs.load_run(lazy_run)
  images, _ = analyse.task_data(data.build_stream(config))
  assert sorted(ends) == list(range(len(images)))
  for t, cid in ends.items():
    state, meta = runs.restore_state(lazy_run, learner, cid)
    assert len(meta["task_records"]) == t + 1 and meta["position"]["task"] == t + 1
    jk = experiments.task_kernel(lazy_run, t)
    assert jk.meta["checkpoint"] == str(cid)
    if t == len(images) - 1:
      x = np.concatenate([images[s][jk.indices[s]] for s in jk.tasks])
      want = _dense_kernel(learner, state, readouts.probes(learner.spec.feature_dim, 8), x)
      np.testing.assert_allclose(jk.k, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
