"""ntk_analysis.experiments (a)-(f) on constructed sweeps of records whose answers are known: the
verdicts follow the intervals, the lag control of (a) removes a task-age confounder, the arms of
(b), (c) and (f) are recognised by their configs, and one seed never gives a verdict."""
import copy

import numpy as np
import pandas as pd
import pytest

from ntk_analysis import experiments
from ntkcl_jax import switches

T = 5  # tasks


def _config(**method):
  return {"seed": 0, "train": {"keep_checkpoints": 6},
          "data": {"name": "digits", "num_classes": 10, "increment": 2,
                   "max_per_class_train": 40, "subsample_per_seed": True},
          "model": {"name": "tiny", "image_size": 16, "checkpoint": "", "overrides": {}},
          "optim": {"epochs": 2},
          "method": {"name": "ntkcl", "variant": "official", "dis_temp": 1e-4, "reg_temp": 1e-3,
                     "frozen_update": "ema", **{s: False for s in switches.NAMES},
                     **method}}


def _record(arm, seed, acc=None, pairs=None, tasks=None, config=None, **extra):
  acc = acc if acc is not None else np.tril(np.full((T, T), 80.0))
  acc = np.where(np.tril(np.ones((T, T))) > 0, acc, np.nan)
  last = acc[-1]
  forgetting = float(np.mean([np.nanmax(acc[:-1, s]) - last[s] for s in range(T - 1)]))
  cfg = copy.deepcopy(config or _config())
  cfg["seed"] = seed
  return {"arm": arm, "seed": seed, "config": cfg, "command": f"python -m ntkcl_jax.train "
          f"--workdir=r/{arm}/seed{seed} --config.seed={seed}",
          "results": {"accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row]
                                          for row in acc],
                      "last_accuracy": float(np.mean(last)), "forgetting": forgetting},
          "pairs": pairs or [], "tasks": tasks or [], "n_per_task": 16, **extra}


def _pairs(rho_of):
  return [{"s": s, "t": t, "rho": rho_of(s, t), "rho_centred": rho_of(s, t) / 2,
           "principal_cos_topk": rho_of(s, t)} for t in range(1, T) for s in range(t)]


def _acc_from_drops(drop_of):
  """An accuracy matrix whose DeltaA(s<-t) = A[t-1, s] - A[t, s] is drop_of(s, t)."""
  a = np.full((T, T), np.nan)
  for s in range(T):
    a[s, s] = 90.0
    for t in range(s + 1, T):
      a[t, s] = a[t - 1, s] - drop_of(s, t)
  return a


def test_a_holds_when_overlap_orders_forgetting_within_each_lag():
  recs = []
  for seed in range(5):
    rng = np.random.default_rng(seed)
    rho = {(s, t): rng.uniform(0.2, 0.9) for t in range(1, T) for s in range(t)}
    recs.append(_record("base", seed, acc=_acc_from_drops(lambda s, t: 20 * rho[(s, t)]),
                        pairs=_pairs(lambda s, t: rho[(s, t)])))
  res = experiments.interference(experiments.Sweep(recs))
  main = res["findings"][0]
  assert main["estimate"] == pytest.approx(1.0) and main["n"] == 5
  assert res["verdict"] == "holds" and main["verdict"] == "holds"


def test_a_partial_correlation_removes_a_task_age_confounder():
  """rho and the drop both follow the lag and are otherwise independent: the raw rank
  correlation is strongly positive, the within-lag one is not, so (a) does not hold."""
  recs = []
  for seed in range(20):  # the per-seed correlations have 6 degrees of freedom each
    rng = np.random.default_rng(100 + seed)
    noise_r = {(s, t): rng.normal() for t in range(1, T) for s in range(t)}
    noise_d = {(s, t): rng.normal() for t in range(1, T) for s in range(t)}
    recs.append(_record("base", seed,
                        acc=_acc_from_drops(lambda s, t: 10 * (t - s) + noise_d[(s, t)]),
                        pairs=_pairs(lambda s, t: 0.2 * (t - s) + 0.01 * noise_r[(s, t)])))
  df = pd.DataFrame(experiments.interference(experiments.Sweep(recs))["tables"]["pairs"])
  from ntkcl_jax import evidence  # pylint: disable=g-import-not-at-top
  assert evidence.spearman(df["rho"], df["drop"]) > 0.7  # the confounded, uncontrolled view
  res = experiments.interference(experiments.Sweep(recs))
  assert res["verdict"] != "holds" and abs(res["findings"][0]["estimate"]) < 0.3


def test_one_seed_never_gives_a_verdict():
  rho = lambda s, t: 0.1 * (s + 1) * t  # noqa: E731
  rec = _record("base", 0, acc=_acc_from_drops(lambda s, t: rho(s, t)), pairs=_pairs(rho))
  res = experiments.interference(experiments.Sweep([rec]))
  assert all(f["verdict"] == "inconclusive" for f in res["findings"])
  assert "one seed" in res["findings"][0]["note"]


def _orth_sweep(fix_delta, official_delta=0.0, seeds=5):
  recs = []
  fix = {"variant": "corrected", "fix_orth": True}
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    base_rho = 0.9 + 0.02 * rng.normal()
    base_f = 10 + rng.normal()
    def arm(name, cfg, d_rho, d_f):
      acc = _acc_from_drops(lambda s, t, d=d_f: (base_f + d) / 2 if t == s + 1 else 0.0)
      return _record(name, seed, acc=acc, pairs=_pairs(lambda s, t, d=d_rho: base_rho + d),
                     config=cfg)
    recs += [arm("base", _config(), official_delta, 0.0),
             arm("dis_temp=0", _config(dis_temp=0.0), 0.0, 0.0),
             arm("dis_temp=0.01,fix_orth=True,variant=corrected",
                 _config(dis_temp=0.01, **fix), fix_delta + 0.001 * rng.normal(),
                 -3 + 0.2 * rng.normal())]
  return experiments.Sweep(recs)


def test_b_pairs_each_arm_with_the_zero_weight_control():
  res = experiments.orthogonality(_orth_sweep(fix_delta=-0.05))
  f = {r["quantity"]: r for r in res["findings"]}
  assert f["fix_orth at 0.01: Delta mean rho"]["verdict"] == "holds"
  assert f["fix_orth at 0.01: Delta mean rho"]["estimate"] == pytest.approx(-0.05, abs=0.002)
  assert f["fix_orth at 0.01: Delta forgetting"]["verdict"] == "holds"
  # the official arm at 1e-4 equals the control here: the paper's '<0' is not met, the code's
  # 'no effect' holds within the margins
  assert f["signed sum (official) at 0.0001: Delta mean rho"]["verdict"] == "inconclusive"
  assert f["signed sum (official) at 0.0001: Delta mean rho (code: no effect)"]["verdict"] == \
      "holds"
  assert res["verdict"] == "holds"
  worse = experiments.orthogonality(_orth_sweep(fix_delta=+0.05))
  assert {r["quantity"]: r for r in worse["findings"]}[
      "fix_orth at 0.01: Delta mean rho"]["verdict"] == "fails"
  assert worse["verdict"] == "fails"


def test_b_official_effect_beyond_the_margin_fails_the_no_effect_prediction():
  res = experiments.orthogonality(_orth_sweep(fix_delta=-0.05, official_delta=0.03))
  f = {r["quantity"]: r for r in res["findings"]}
  assert f["signed sum (official) at 0.0001: Delta mean rho (code: no effect)"]["verdict"] == \
      "fails"


def test_b_ignores_arms_that_change_more_than_the_term():
  recs = list(_orth_sweep(-0.05).records)
  other = _record("dis_temp=0.01,fix_fusion=True,fix_orth=True,variant=corrected", 0,
                  config=_config(dis_temp=0.01, variant="corrected", fix_orth=True,
                                 fix_fusion=True))
  res = experiments.orthogonality(experiments.Sweep(recs + [other]))
  assert all("fix_fusion" not in a["arm"] for a in res["tables"]["arms"])


def _views(ratio):
  """Per-task effective ranks with r_eff(stacked) / r_eff(fused) = ratio."""
  return {"per_task": [{"task": t, "r_eff": {"channel": 2.0, "patch": 1.0, "fused": 2.0,
                                              "stacked": 2.0 * ratio},
                        "r_eff_centred": {"channel": 3.0, "patch": 1.0, "fused": 3.0,
                                          "stacked": 3.0}} for t in range(T)]}


def test_c_view_ratio_against_the_stated_threshold_and_the_gap_slope():
  recs = []
  for seed in range(5):
    rng = np.random.default_rng(seed)
    recs.append(_record("base", seed, views=_views(1.2 + 0.05 * rng.normal()),
                        gap=[{"task": t, "train_acc": 100.0,
                              "test_acc": 100 - 40 / np.sqrt(40)} for t in range(T)]))
    for n in (10, 20):
      g = 40 / np.sqrt(n) * np.exp(0.02 * rng.normal())
      recs.append(_record(f"max_per_class_train={n}", seed,
                          config=_config() | {"data": dict(_config()["data"],
                                                           max_per_class_train=n)},
                          gap=[{"task": t, "train_acc": 100.0, "test_acc": 100 - g}
                               for t in range(T)]))
  res = experiments.views_and_sample_size(experiments.Sweep(recs))
  f = {r["quantity"]: r for r in res["findings"]}
  ratio = f["r_eff(stacked 3n) / r_eff(fused n) at theta_T"]
  assert ratio["verdict"] == "fails" and ratio["estimate"] == pytest.approx(1.2, abs=0.05)
  assert ratio["prediction"] == "> 2"
  slope = f["log-log slope of the gap against images per class"]
  assert slope["estimate"] == pytest.approx(-0.5, abs=0.03) and slope["verdict"] == "holds"
  assert f["the same slope against N^-1/2"]["verdict"] == "holds"
  assert {p["n_per_class"] for p in res["tables"]["gap"]} == {10.0, 20.0, 40.0}


def _lazy(e_lin, agreement):
  return [{"task": t, "S": 0.01, "S_centred": 0.02, "relative_change": 0.1,
           "e_lin": 5.0 if t == 0 else e_lin, "acc_real": 0.9, "acc_lin": 0.85,
           "agreement": 0.2 if t == 0 else agreement, "e_fun": 0.1, "steps": 10}
          for t in range(T)]


@pytest.mark.parametrize("e_lin,agreement,want", [(0.05, 0.97, "holds"), (0.6, 0.97, "fails"),
                                                  (0.05, 0.5, "fails")])
def test_d_verdict_from_both_criteria_with_task0_apart(e_lin, agreement, want):
  recs = [_record("base", s, lazy=_lazy(e_lin * (1 + 0.01 * s), agreement)) for s in range(4)]
  res = experiments.laziness(experiments.Sweep(recs))
  assert res["verdict"] == want
  assert "task 0" in res["note"]  # shown apart, left out of the verdict


def _tasks(top3_centred, drift=0.01):
  return [{"task": t, "at_t": {"top3_share": 0.95, "top3_share_centred": top3_centred,
                               "effective_rank": 1.5, "effective_rank_centred": 6.0,
                               "spectrum": [0.9, 0.1], "spectrum_centred": [0.5, 0.5]},
           "drift_S": drift, "drift_S_centred": 2 * drift} for t in range(T)]


def test_e_fast_decay_is_judged_on_the_centred_kernel():
  flat = [_record("base", s, tasks=_tasks(0.3 + 0.01 * s)) for s in range(5)]
  res = experiments.spectra_and_groups(experiments.Sweep(flat))
  assert res["verdict"] == "fails"  # the raw share (0.95) would have passed
  assert res["findings"][1]["verdict"] == "holds"
  steep = [_record("base", s, tasks=_tasks(0.8 + 0.01 * s),
                   groups={"shares": {"adapter up": 0.7, "fusion V": 0.3},
                           "shares_centred": {"adapter up": 0.6, "fusion V": 0.4}})
           for s in range(5)]
  res = experiments.spectra_and_groups(experiments.Sweep(steep))
  assert res["verdict"] == "holds"
  assert [g["group"] for g in res["tables"]["groups"]] == ["adapter up", "fusion V"]


def test_f_u_shape_with_leave_one_seed_out_and_ema_against_copy():
  recs = []
  curve = {0.0: 50.0, 1e-3: 52.0, 1.0: 60.0, 100.0: 40.0}
  for seed in range(5):
    rng = np.random.default_rng(seed)
    for r, a_t in curve.items():
      acc = np.full((T, T), a_t + rng.normal())
      name = "base" if r == 1e-3 else f"reg_temp={r:g}"
      recs.append(_record(name, seed, acc=acc, config=_config(reg_temp=r),
                          tasks=_tasks(0.5, drift=0.01)))
    recs.append(_record("frozen_update=copy", seed, acc=np.full((T, T), 45.0),
                        config=_config(frozen_update="copy"), tasks=_tasks(0.5, drift=0.2)))
  res = experiments.regularisation_and_ema(experiments.Sweep(recs))
  f = {r["quantity"]: r for r in res["findings"]}
  assert f["A_T(interior) - A_T(reg_temp=0)"]["verdict"] == "holds"
  assert f["A_T(interior) - A_T(reg_temp=100)"]["verdict"] == "holds"
  assert {c["reg_temp"] for c in res["tables"]["chosen_interior"]} == {1.0}
  assert f["EMA - copy: old-task kernel drift S"]["verdict"] == "holds"
  assert f["EMA - copy: A_T"]["verdict"] == "holds"
  assert "U shape: holds" in res["headline"]
  monotone = [dict(r) for r in recs]
  for r in monotone:  # accuracy now falls with the weight: no interior optimum
    reg = experiments.flat_config(r["config"])["method.reg_temp"]
    if r["arm"] != "frozen_update=copy":
      r["results"] = dict(r["results"], last_accuracy=60.0 - 5 * np.log10(reg + 1e-4))
  res = experiments.regularisation_and_ema(experiments.Sweep(monotone))
  assert "U shape: fails" in res["headline"]


def test_missing_arms_are_reported_not_judged():
  sweep = experiments.Sweep([_record("base", 0)])
  for key in "bcf":
    res = experiments.ANALYSES[key](sweep)
    assert res["missing"] and res["verdict"] is None
