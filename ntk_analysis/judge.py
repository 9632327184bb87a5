"""Judging a theory sweep (docs/ntk_theory.md §4): the records of scripts/theory.py over seeds,
read into experiments (a)-(f), each with the paper's prediction, its control, a criterion fixed
before measuring and a verdict read off Student-t intervals of per-seed values
(ntkcl_jax/evidence.py). (e) is a measurement, not a verdict.

    sweep = judge.Sweep.load("runs/theory")
    result = judge.EXPERIMENTS["a"](sweep)      # {'prediction', 'criterion', 'findings', ...}

Arms are recognised by how their config differs from the base arm's (Sweep.differing), so each
comparison is between runs that differ in one thing only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ntk_analysis import measure, metrics, plots
from ntkcl_jax import evidence
from ntkcl_jax import same_run
from ntkcl_jax import switches

# Criteria, fixed before measuring (docs/ntk.md prints each next to its result).
RHO_MARGIN = 0.01  # |Delta mean centred rho| that counts as no effect
ACC_MARGIN = 1.0  # |Delta| in accuracy points that counts as no effect
QUIET, LOUD = 0.01, 0.1  # (b): a term whose gradient is below QUIET x the cross-entropies'
#                          predicts no effect, above LOUD an effect (between: no prediction)
VIEWS_MIN = 2.5  # 'N -> 3N' if the effective number of views (effective_views) lies above
#                  this: midway between the fused view adding nothing to the two branches
#                  (about 1.9) or 2 (two independent views) and 3 (three)
SLOPE, SLOPE_MARGIN = -0.5, 0.25  # the N^-1/2 rate of the gap, matched within this
AGREEMENT_MIN, E_FUN_MAX = 0.9, 0.3  # (d): lazy if the linearised run agrees above, errs below

NAMES = {"a": "Inter-task overlap vs forgetting", "b": "Orthogonality term",
         "c": "Views and sample size", "d": "Lazy regime", "e": "Spectra and parameter groups",
         "f": "Regularisation and EMA"}


@dataclasses.dataclass
class Sweep:
  """The records of one theory sweep (scripts/theory.py writes one per arm and seed)."""
  records: list

  @classmethod
  def load(cls, root: str) -> "Sweep":
    recs = []
    for arm in sorted(os.listdir(root)):
      d = os.path.join(root, arm)
      for s in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        path = os.path.join(d, s, "record.json")
        if os.path.isfile(path):
          with open(path) as f:
            recs.append(json.load(f))
    return cls(recs)

  def arms(self) -> dict:
    """{arm: {seed: record}}."""
    out: dict = {}
    for r in self.records:
      out.setdefault(r["arm"], {})[int(r["seed"])] = r
    return out

  def base(self) -> dict:
    return self.arms().get("base", {})

  def base_flat(self) -> dict:
    base = self.base()
    return flat(next(iter(base.values()))["config"]) if base else {}

  def differing(self, keys: Iterable[str]) -> dict:
    """{arm: ({seed: record}, flat config)} of the arms (base included) whose config differs
    from the base's in `keys` only."""
    base, keys = self.base_flat(), set(keys)
    out = {}
    for arm, by_seed in self.arms().items():
      cfg = flat(next(iter(by_seed.values()))["config"])
      if {k for k in set(cfg) | set(base) if cfg.get(k) != base.get(k)} <= keys:
        out[arm] = (by_seed, cfg)
    return out


def flat(cfg: Mapping) -> dict:
  """The flat keys that name a run (same_run.flat), the seed left out."""
  return {k: v for k, v in same_run.flat(cfg).items() if k != "seed"}


# -- findings -----------------------------------------------------------------------------------
def finding(quantity: str, iv: evidence.Interval, prediction: Optional[str] = None,
            margin: float = 0.0, threshold: float = 0.0, digits: int = 2,
            unit: Optional[float] = 1.0) -> dict:
  """One row of an experiment's results: the estimate with its t interval, n and the bootstrap
  beside it, and (with a prediction '>0', '<0', '=0' about the quantity minus `threshold`) its
  verdict. `unit`: the numbers are printed in units of it, None: a power of ten chosen from them
  when all lie below 0.01 (a drift of order 1e-6 would read 0.0000); the verdict is read off the
  interval as measured."""
  verdict = None
  if prediction is not None:
    verdict = evidence.verdict(iv.shifted(threshold), prediction, margin)
  if unit is None:
    top = np.nanmax(np.abs([iv.estimate, iv.lo, iv.hi, 0.0]))
    unit = 10.0 ** np.floor(np.log10(top)) if 0 < top < 1e-2 else 1.0
  if unit != 1.0:
    quantity = f"{quantity} (units of {unit:g})"
    iv = iv.scaled(unit)
    threshold, margin = threshold / unit, margin / unit
  text = None
  if prediction is not None:
    text = ({"=0": f"within ±{margin:g} of {threshold:g}",
             ">0": f"> {threshold + margin:g}", "<0": f"< {threshold - margin:g}"}[prediction])
  signed = "Δ" in quantity or " − " in quantity or "slope" in quantity
  return {"quantity": quantity, "prediction": text, "estimate": iv.estimate, "lo": iv.lo,
          "hi": iv.hi, "threshold": threshold, "n": iv.n, "text": iv.text(digits, signed=signed),
          "bootstrap": iv.boot_text(digits, signed=signed), "verdict": verdict}


def combine(verdicts: Sequence[Optional[str]]) -> Optional[str]:
  """'holds' if all hold, 'fails' if any fails, else 'inconclusive' (None: no verdicts)."""
  verdicts = [v for v in verdicts if v is not None]
  if not verdicts:
    return None
  if "fails" in verdicts:
    return "fails"
  return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"


def result(key: str, prediction: str, control: str, criterion: str, findings: list,
           verdict: Optional[str], tables: Optional[dict] = None, plot: Optional[str] = None,
           missing: str = "") -> dict:
  return {"experiment": key, "name": NAMES[key], "prediction": prediction, "control": control,
          "criterion": criterion, "findings": findings, "verdict": verdict,
          "tables": measure.rounded(tables or {}, 4),
          "plot": os.path.basename(plot) if plot else None, "missing": missing}


def _seeds(*by_seed: Mapping) -> list:
  return sorted(set.intersection(*[set(b) for b in by_seed])) if by_seed else []


def _acc(rec) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row]
                   for row in rec["results"]["accuracy_matrix"]], np.float64)


# -- (a) ----------------------------------------------------------------------------------------
A_PREDICTORS = (("interference", "interference term"), ("rho_centred", "centred rho"),
                ("rho", "rho"))


def interference(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(a): forgetting of task s caused by training task tau, net of SimpleCIL's drop (same seed,
  s and tau), against the predictors at theta_tau^0, task age held fixed."""
  prediction = ("forgetting of task s caused by training task tau grows with the predicted "
                "interference K_{s,tau}(K_{tau,tau}+lambda I)^-1 R_tau at theta_tau^0 (the "
                "task-interplay term of the kernel-ridge picture, docs/ntk_theory.md §2.2) and "
                "with the inter-task overlap rho_{s,tau}")
  control = ("SimpleCIL on the same seed (same class order and images): its drop "
             "A[tau-1, s] - A[tau, s] is the dilution by task tau's new competitor classes, which "
             "no training causes; it is subtracted pair by pair")
  criterion = ("per seed, the Spearman correlation of each predictor with the net drop over the "
               "seed's pairs s < tau, ranks centred within each lag tau - s (task age held "
               "fixed); '> 0' holds if the t interval over seeds lies above 0, fails if below. "
               "The verdict is the interference term's; rho is reported beside it")
  base, simple = sweep.base(), sweep.differing({"method.name"})
  simple = next((b for b, cfg in simple.values() if cfg.get("method.name") == "simplecil"), {})
  seeds = [s for s in _seeds(base, simple) if base[s].get("pairs")]
  if not seeds:
    return result("a", prediction, control, criterion, [], None,
                  missing="needs the base arm's pair kernels and the SimpleCIL arm")
  rows = []
  for seed in seeds:
    a, c = _acc(base[seed]), _acc(simple[seed])
    for p in base[seed]["pairs"]:
      s, t = p["s"], p["t"]
      rows.append({"seed": seed, "s": s, "tau": t, "lag": t - s,
                   "drop": a[t - 1, s] - a[t, s], "control_drop": c[t - 1, s] - c[t, s],
                   "net_drop": (a[t - 1, s] - a[t, s]) - (c[t - 1, s] - c[t, s]),
                   **{k: p[k] for k, _ in A_PREDICTORS}, "feature_drift": p["feature_drift"]})

  def per_seed(col, target="net_drop"):
    return evidence.t_interval([evidence.partial_spearman(
        [r[col] for r in rows if r["seed"] == s], [r[target] for r in rows if r["seed"] == s],
        [r["lag"] for r in rows if r["seed"] == s]) for s in seeds])
  found = [finding(f"Spearman({name}, net drop | lag)", per_seed(col), ">0")
           for col, name in A_PREDICTORS]
  found.append(finding("Spearman(interference term, measured feature drift | lag)",
                       per_seed("interference", "feature_drift"), ">0"))
  found.append(finding("mean net drop (points)",
                       evidence.t_interval([np.mean([r["net_drop"] for r in rows
                                                     if r["seed"] == s]) for s in seeds])))
  if plot_path:
    plots.interference_scatter(rows, plot_path)
  return result("a", prediction, control, criterion, found, found[0]["verdict"],
                {"pairs": rows}, plot_path)


# -- (b) ----------------------------------------------------------------------------------------
def _mean(rec, part, col):
  vals = [p[col] for p in rec.get(part) or []]
  return float(np.mean(vals)) if vals else None


def _orth_arms(sweep: Sweep) -> dict:
  """{(kind, weight): {seed: record}} for kind 'official' (the signed sum) and 'fix_orth' (the
  corrected penalty, everything else official)."""
  base = sweep.base_flat()
  keys = {"method.dis_temp", "method.variant"} | {f"method.{s}" for s in switches.NAMES}
  sw0, out = switches.from_flat(base), {}
  for by_seed, cfg in sweep.differing(keys).values():
    sw = switches.from_flat(cfg)
    kind = ("official" if sw == sw0 else
            "fix_orth" if sw == dict(sw0, fix_orth=True) else None)
    if kind:
      out[(kind, float(cfg["method.dis_temp"]))] = by_seed
  return out


def gradient_scale(sweep: Sweep) -> dict:
  """{kind: mean over the base's seeds of |grad L_orth| / |grad sum CE| at theta_1^0} (the
  scale of each orthogonality term per unit weight, measured in the base run)."""
  vals: dict = {"official": [], "fix_orth": []}
  for rec in sweep.base().values():
    g = rec.get("grad_scale") or {}
    if g.get("ce"):
      vals["official"].append(g["orth_official"] / g["ce"])
      vals["fix_orth"].append(g["orth_corrected"] / g["ce"])
  return {k: float(np.mean(v)) for k, v in vals.items() if v}


def orthogonality(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(b): each orthogonality arm against its own zero-weight control."""
  prediction = ("paper: a positive weight on the orthogonality term attenuates the inter-task "
                "kernel (lower centred rho) and forgetting. Code level: an arm's effect follows "
                "its gradient's scale: weight x |grad L_orth| / |grad CE| measured at the start "
                f"of task 1 in the base run; below {QUIET:g} the term cannot move training (no "
                f"effect), above {LOUD:g} it moves it (an effect), between: no prediction")
  control = ("the same kind of term at weight 0 (dis_temp = 0), everything else equal: the "
             "official signed sum against the official run at 0, fix_orth against fix_orth at 0")
  criterion = (f"paired per seed, arm - control. Paper: Delta mean centred rho '< 0' and Delta "
               f"forgetting '< 0'; the paper's verdict combines the fix_orth arms (the "
               f"orthogonality penalty the paper writes; the official signed sum is a linear "
               f"term, docs/method.md), the signed sum's rows carry the same predictions beside "
               f"it. Code: 'no effect' holds if Delta mean centred rho lies within "
               f"±{RHO_MARGIN:g} and Delta A_T within ±{ACC_MARGIN:g} point; 'an effect' holds "
               f"if either interval lies wholly outside its band")
  arms, scale = _orth_arms(sweep), gradient_scale(sweep)
  metric = {"mean centred rho": lambda r: _mean(r, "pairs", "rho_centred"),
            "forgetting": lambda r: r["results"]["forgetting"],
            "A_T": lambda r: r["results"]["last_accuracy"]}
  found, table, verdicts = [], [], []
  for kind in ("official", "fix_orth"):
    zero = arms.get((kind, 0.0))  # this kind's zero-weight control arm: {seed: record}
    for w in sorted(w for (k, w) in arms if k == kind and w > 0):
      if zero is None:
        continue
      d = {m: evidence.paired({s: fn(r) for s, r in arms[(kind, w)].items()},
                              {s: fn(r) for s, r in zero.items()}) for m, fn in metric.items()}
      label = f"{'signed sum (official)' if kind == 'official' else 'fix_orth'} at {w:g}"
      rel = w * scale[kind] if kind in scale else None
      code = (None if rel is None else "no effect" if rel < QUIET else
              "an effect" if rel > LOUD else None)
      rows = [finding(f"{label}: Δ mean centred rho", d["mean centred rho"], "<0", digits=4),
              finding(f"{label}: Δ forgetting", d["forgetting"], "<0"),
              finding(f"{label}: Δ A_T", d["A_T"])]
      if code == "no effect":
        rows += [finding(f"{label}: Δ mean centred rho (code: no effect)",
                         d["mean centred rho"], "=0", RHO_MARGIN, digits=4),
                 finding(f"{label}: Δ A_T (code: no effect)", d["A_T"], "=0", ACC_MARGIN)]
        verdicts.append(combine([rows[-2]["verdict"], rows[-1]["verdict"]]))
      elif code == "an effect":
        outside = [evidence.verdict(d["mean centred rho"], "=0", RHO_MARGIN),
                   evidence.verdict(d["A_T"], "=0", ACC_MARGIN)]
        v = ("holds" if "fails" in outside else
             "fails" if all(o == "holds" for o in outside) else "inconclusive")
        rows.append({**finding(f"{label}: an effect on centred rho or A_T (code)",
                               d["mean centred rho"]), "verdict": v,
                     "prediction": f"outside ±{RHO_MARGIN:g} (rho) or ±{ACC_MARGIN:g} (A_T)"})
        verdicts.append(v)
      found += rows
      table.append({"arm": label, "relative gradient scale": rel, "code prediction": code,
                    "seeds": d["A_T"].n})
  if not found:
    return result("b", prediction, control, criterion, [], None,
                  missing="needs the zero-weight controls and at least one weighted arm")
  if plot_path:
    plots.findings([f for f in found if "(code" not in f["quantity"]], plot_path,
                   "(b) arm - zero-weight control")
  paper = [f["verdict"] for f in found if f["quantity"].startswith("fix_orth")
           and "(code" not in f["quantity"]
           and f["quantity"].endswith(("Δ mean centred rho", "Δ forgetting"))]
  res = result("b", prediction, control, criterion, found, combine(paper),
               {"arms": table, "gradient scale per unit weight (|grad L_orth| / |grad sum CE|, "
                "base run, start of task 1)": [{"term": k, "scale": v} for k, v in scale.items()]},
               plot_path)
  res["code_verdict"] = combine(verdicts)
  return res


# -- (c) ----------------------------------------------------------------------------------------
def _per_class(rec) -> float:
  return float(flat(rec["config"]).get("data.max_per_class_train") or np.nan)


def _gap(rec, key_train, key_test) -> Optional[float]:
  rows = rec.get("gap") or []
  vals = [r[key_test] - r[key_train] if "ce" in key_train else r[key_train] - r[key_test]
          for r in rows if key_train in r and key_test in r]
  return float(np.mean(vals)) if vals else None


def effective_views(view: dict) -> float:
  """The effective number of independent views of one task's three-view kernel:
  r_eff(stacked) / geometric mean of each view's r_eff, i.e. exp(H(stacked) - mean_v H(v)) for the
  spectral entropies H. Each view at unit trace, it is 1 for three copies of one view and exactly
  3 for three views with mutually orthogonal tangent features."""
  ranks = np.array(list(view["r_eff_views"].values()), np.float64)
  return float(view["r_eff_stacked"] / np.exp(np.mean(np.log(ranks))))


def views_and_sample_size(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(c): the gap at each task's own end against the images per class, with SimpleCIL at the
  same N as control, and the stacked three-view kernel against one view."""
  prediction = ("the task-specific generalisation gap falls like N^-1/2 with the training "
                "images per class N; the three views (channel, patch, fused) act like 3N samples "
                "('N -> 3N')")
  control = ("N: every N trained for the base's SGD steps per task (epochs scaled by "
             "N_base / N), SimpleCIL at each N for the prototype classifier's gap (what falls "
             "with N without any training); views: each view's kernel alone")
  criterion = (f"gap = test - train cross-entropy of the trained proxy head at the task's own "
               f"end (mean over tasks), of either sign; per seed its least-squares slope "
               f"against log N: '< 0' holds if its t interval lies below 0. Per seed the "
               f"log-log slope: it matches N^-1/2 if the interval lies within "
               f"{SLOPE:g} ± {SLOPE_MARGIN:g} (a seed with a gap <= 0 at some N follows no "
               f"power law: it is left out of this one and counted on the page). Prototype "
               f"classifier: "
               f"leave-one-out training accuracy - test accuracy (either sign), least-squares "
               f"slope against log N, paired NTK-CL - SimpleCIL '< 0'. "
               f"Views: the effective number of views, r_eff(stacked 3n x 3n, each view centred "
               f"over the samples, then at unit trace) / the geometric mean of the three views' "
               f"centred r_eff, mean over tasks: 1 for three copies of one view, 3 for three "
               f"independent ones. The channel and patch branches share no trainable parameter, "
               f"so their tangent features are orthogonal by construction: a fused view that "
               f"copies one branch gives about 1.9, two independent views 2. 'N -> 3N' holds "
               f"above {VIEWS_MIN:g} (the fused view adds at least half a view of its own), "
               f"fails below. The verdict combines the CE slope's '< 0' and 'N -> 3N'; the "
               f"N^-1/2 match and the prototype classifier's slope are judged beside it")
  found, tables, verdicts = [], {}, []
  arms = sweep.differing({"data.max_per_class_train", "optim.epochs", "method.name"})
  by_kind: dict = {"ntkcl": {}, "simplecil": {}}
  for by_seed, cfg in arms.values():
    kind = "simplecil" if cfg.get("method.name") == "simplecil" else "ntkcl"
    if kind == "ntkcl" and cfg.get("method.name") != sweep.base_flat().get("method.name"):
      continue
    for seed, rec in by_seed.items():
      if rec.get("gap"):
        by_kind[kind].setdefault(seed, []).append(rec)
  points = []
  for kind, by_seed in by_kind.items():
    for seed, recs in by_seed.items():
      for rec in recs:
        points.append({"kind": kind, "seed": seed, "n_per_class": _per_class(rec),
                       "proxy_ce_gap": _gap(rec, "proxy_train_ce", "proxy_test_ce"),
                       "proxy_acc_gap": _gap(rec, "proxy_train_acc", "proxy_test_acc"),
                       "ncm_gap": _gap(rec, "ncm_train_loo", "ncm_test")})

  grid = sorted({p["n_per_class"] for p in points if p["kind"] == "ntkcl"})

  def slopes(kind, col, fit):
    """Per seed, the slope over the whole N grid (a seed missing an N has none yet)."""
    mine: dict = {}
    for p in points:
      if p["kind"] == kind:
        mine.setdefault(p["seed"], {})[p["n_per_class"]] = p[col]
    return {s: fit(grid, [np.nan if by_n[n] is None else by_n[n] for n in grid])
            if sorted(by_n) == grid else float("nan") for s, by_n in sorted(mine.items())}
  if len(grid) >= 2:
    falls = slopes("ntkcl", "proxy_ce_gap", metrics.slope_on_log_x)
    power = slopes("ntkcl", "proxy_ce_gap", metrics.loglog_slope)
    non_positive = sum(any(p["proxy_ce_gap"] is not None and p["proxy_ce_gap"] <= 0
                           for p in points if p["kind"] == "ntkcl" and p["seed"] == s)
                       for s in power)
    f1 = finding("slope of the proxy-head CE gap against log N",
                 evidence.t_interval(list(falls.values())), "<0", unit=None)
    f2 = finding("slope of log(proxy-head CE gap) against log N, against N^-1/2" + (
        f" ({non_positive} seed(s) left out: a gap <= 0)" if non_positive else ""),
                 evidence.t_interval(list(power.values())), "=0", SLOPE_MARGIN, threshold=SLOPE)
    ncm = slopes("ntkcl", "ncm_gap", metrics.slope_on_log_x)
    ncm_ctl = slopes("simplecil", "ncm_gap", metrics.slope_on_log_x)
    f3 = finding("slope of the prototype-classifier gap against log N, NTK-CL − SimpleCIL "
                 "(paired)", evidence.paired(ncm, ncm_ctl), "<0", digits=3)
    found += [f1, f2, f3, finding("slope of the prototype-classifier gap against log N, "
                                  "SimpleCIL alone", evidence.t_interval(list(ncm_ctl.values())),
                                  digits=3)]
    verdicts.append(f1["verdict"])
    tables["gap_points"] = points
  ratio = {}
  for seed, rec in sorted(sweep.base().items()):
    per = rec.get("views") or []
    if per:
      ratio[seed] = float(np.mean([effective_views(p) for p in per]))
  if ratio:
    f4 = finding("effective number of views, r_eff(stacked) / geometric mean of the views' "
                 "r_eff, centred", evidence.t_interval(list(ratio.values())), ">0",
                 threshold=VIEWS_MIN)
    found.append(f4)
    verdicts.append(f4["verdict"])
  if not found:
    return result("c", prediction, control, criterion, [], None,
                  missing="needs the N arms with gaps or the base's three-view kernels")
  if plot_path:
    plots.findings(found, plot_path, "(c) slopes and the effective number of views")
  return result("c", prediction, control, criterion, found, combine(verdicts), tables, plot_path)


# -- (d) ----------------------------------------------------------------------------------------
def laziness(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(d): the linearised run against the real one over whole tasks."""
  prediction = ("training a task stays close to its linearisation at theta_t^0, so the NTK "
                "picture applies")
  control = ("the same run linearised at theta_t^0 (ntk_analysis/linear_model.py): the same "
             "images, minibatch order, augmentation, loss terms (cross-entropies, NCE, "
             "orthogonality, L2), dropout masks, optimiser and learning rates; only the model "
             "differs")
  criterion = (f"means over tasks 1..T-1 per seed (task 0 starts at zero-initialised adapters "
               f"and is shown apart): lazy holds if the agreement of the two runs' test "
               f"predictions lies above {AGREEMENT_MIN:g} and the relative feature error e_fun "
               f"below {E_FUN_MAX:g}; fails if either lies on the other side")
  per_seed = {}
  for seed, rec in sorted(sweep.base().items()):
    rows = [r for r in rec.get("lazy") or [] if r["task"] >= 1]
    if rows:
      per_seed[seed] = {k: float(np.mean([r[k] for r in rows]))
                        for k in ("agreement", "e_fun", "e_lin", "S", "acc_real", "acc_lin")}
  if not per_seed:
    return result("d", prediction, control, criterion, [], None,
                  missing="needs the base arm's lazy part")

  def col(k):
    return evidence.t_interval([v[k] for v in per_seed.values()])
  a = finding("agreement of linearised and real test predictions", col("agreement"), ">0",
              threshold=AGREEMENT_MIN, digits=3)
  e = finding("e_fun = |phi_lin - phi_real| / |phi_real - phi_0| on test images", col("e_fun"),
              "<0", threshold=E_FUN_MAX, digits=3)
  found = [a, e, finding("e_lin of the real update (one JVP)", col("e_lin"), digits=3),
           finding("S(K(theta_t^0), K(theta_t))", col("S"), unit=None),
           finding("accuracy real − linearised (points)", evidence.paired(
               {s: 100 * v["acc_real"] for s, v in per_seed.items()},
               {s: 100 * v["acc_lin"] for s, v in per_seed.items()}))]
  task0 = [r for rec in sweep.base().values() for r in rec.get("lazy") or [] if r["task"] == 0]
  tables = {"task 0 (from the zero-initialised adapters, not judged)": [
      {k: float(np.mean([r[k] for r in task0])) for k in ("agreement", "e_fun", "e_lin", "S")}]
      if task0 else []}
  if plot_path:
    plots.findings(found[:3], plot_path, "(d) linearised vs real run")
  return result("d", prediction, control, criterion, found, combine([a["verdict"], e["verdict"]]),
                tables, plot_path)


# -- (e) ----------------------------------------------------------------------------------------
def spectra_and_groups(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(e): a measurement: each parameter group's share of the kernel's trace against its share of
  the parameters (centred kernels), and the task spectra."""
  prediction = ("none stated by the method that could fail: the paper makes no claim about the "
                "kernel's spectrum or which parameters carry it, so this is a measurement")
  control = "each group's share of the parameters (a kernel spread evenly over them)"
  criterion = "no verdict: per group, trace share and parameter share with t intervals"
  groups: dict = {}
  for rec in sweep.base().values():
    for g, v in (rec.get("groups") or {}).items():
      groups.setdefault(g, []).append(v)
  if not groups:
    return result("e", prediction, control, criterion, [], None,
                  missing="needs the base arm's groups part")
  table = []
  for g, vals in sorted(groups.items()):
    iv = {k: evidence.t_interval([v[k] for v in vals])
          for k in ("param_share", "trace_share", "centred_share")}
    table.append({"group": g, "parameters": int(vals[0]["params"]),
                  **{k: iv[k].text(3, signed=False) for k in iv}})
  spectra = []
  for rec in sweep.base().values():
    for t in rec.get("tasks") or []:
      spectra.append(t["at_t"]["top3_share_centred"])
  found = [finding("top-3 share of the centred task kernel at theta_t (mean over tasks)",
                   evidence.t_interval([np.mean([t["at_t"]["top3_share_centred"]
                                                 for t in rec.get("tasks") or []])
                                        for rec in sweep.base().values() if rec.get("tasks")]),
                   digits=3)] if spectra else []
  if plot_path:
    plots.group_shares(table, groups, plot_path)
  return result("e", prediction, control, criterion, found, None, {"groups": table}, plot_path)


# -- (f) ----------------------------------------------------------------------------------------
def stability_bound(base_flat: Mapping) -> float:
  """The largest reg_temp at which SGD with momentum m and learning rate lr stays stable on the
  L2 term alone: its curvature 2 reg_temp must satisfy lr * 2 reg_temp < 2 (1 + m)."""
  lr, m = float(base_flat["optim.lr"]), float(base_flat["optim.momentum"])
  return (1 + m) / lr


def _old_drift(rec) -> Optional[float]:
  t = rec.get("tasks") or []
  return float(np.mean([x["drift_S"] for x in t[:-1]])) if len(t) > 1 else None


def regularisation_and_ema(sweep: Sweep, plot_path: Optional[str] = None) -> dict:
  """(f): the reg_temp grid inside the stable range (U shape of A_T; drift falling with it) and
  the EMA of the frozen sets against copying the last task's values."""
  prediction = ("'appropriate regularisation': A_T is highest at an interior reg_temp, above both "
                "ends of the grid, and a larger reg_temp lowers old tasks' kernel drift; the "
                "adaptive EMA keeps old tasks' kernels (less drift) and helps accuracy")
  base = sweep.base_flat()
  bound = stability_bound(base) if base else float("nan")
  control = ("reg_temp: every other value of the grid on the same seed; EMA: the 'copy' arm, "
             "the frozen set overwritten with the last task's values at the same architecture")
  criterion = ("the grid stays below the stability bound reg_temp < (1 + momentum) / lr" +
               (f" = {bound:.3g}" if np.isfinite(bound) else " of the base config") +
               " (the L2 term's curvature 2 reg_temp against SGD's limit 2(1+m)/lr). "
               f"U shape: A_T at the interior value chosen on the other seeds (leave one seed "
               f"out) minus A_T at each end, paired, both '> 0'. Drift: per seed Spearman(reg_temp, "
               f"mean old-task drift S over every adapted parameter) '< 0'. EMA - copy: old-task "
               f"drift '< 0' and A_T '> 0', separate verdicts")
  found, tables, verdicts = [], {}, {}
  reg = sweep.differing({"method.reg_temp"})
  by_r = {float(cfg["method.reg_temp"]): b for b, cfg in reg.values()}
  if len(by_r) >= 3:
    rs = sorted(by_r)
    seeds = _seeds(*by_r.values())
    acc = {r: {s: by_r[r][s]["results"]["last_accuracy"] for s in seeds} for r in rs}
    interior = rs[1:-1]
    chosen = {s: max(interior, key=lambda r: np.mean([acc[r][u] for u in seeds if u != s]
                                                      or [acc[r][s]])) for s in seeds}
    lo = finding(f"A_T(interior) − A_T(reg_temp={rs[0]:g})", evidence.t_interval(
        [acc[chosen[s]][s] - acc[rs[0]][s] for s in seeds]), ">0")
    hi = finding(f"A_T(interior) − A_T(reg_temp={rs[-1]:g})", evidence.t_interval(
        [acc[chosen[s]][s] - acc[rs[-1]][s] for s in seeds]), ">0")
    dr = finding("Spearman(reg_temp, old-task drift)", evidence.t_interval(
        [evidence.spearman(rs, [_old_drift(by_r[r][s]) for r in rs]) for s in seeds
         if all(_old_drift(by_r[r][s]) is not None for r in rs)]), "<0")
    found += [lo, hi, dr]
    verdicts["U shape (A_T)"] = combine([lo["verdict"], hi["verdict"]])
    verdicts["drift falls with reg_temp"] = dr["verdict"]
    tables["reg_temp"] = [{"reg_temp": r, "stable": r < bound,
                           "A_T": evidence.t_interval(list(acc[r].values())).text(2, False),
                           "mean old-task drift": float(np.nanmean(
                               [_old_drift(x) or np.nan for x in by_r[r].values()]))}
                          for r in rs]
  copy = {a: v for a, v in sweep.differing({"method.frozen_update"}).items()
          if v[1].get("method.frozen_update") == "copy"}
  if copy and sweep.base():
    cp = next(iter(copy.values()))[0]
    b = sweep.base()
    d_drift = finding("EMA − copy: old-task drift S", evidence.paired(
        {s: _old_drift(r) for s, r in b.items()}, {s: _old_drift(r) for s, r in cp.items()}),
        "<0", unit=None)
    d_acc = finding("EMA − copy: A_T", evidence.paired(
        {s: r["results"]["last_accuracy"] for s, r in b.items()},
        {s: r["results"]["last_accuracy"] for s, r in cp.items()}), ">0")
    found += [d_drift, d_acc]
    verdicts["EMA: drift"] = d_drift["verdict"]
    verdicts["EMA: accuracy"] = d_acc["verdict"]
  if not found:
    return result("f", prediction, control, criterion, [], None,
                  missing="needs at least three reg_temp values or the 'copy' arm")
  if plot_path:
    plots.findings(found, plot_path, "(f) regularisation and EMA")
  res = result("f", prediction, control, criterion, found, None, tables, plot_path)
  res["verdicts"] = verdicts
  return res


EXPERIMENTS: dict[str, Callable] = {
    "a": interference, "b": orthogonality, "c": views_and_sample_size, "d": laziness,
    "e": spectra_and_groups, "f": regularisation_and_ema}


def judge_sweep(sweep: Sweep, keys: str = "abcdef", plot_dir: Optional[str] = None,
                prefix: str = "") -> dict:
  """{key: result} of the chosen experiments; plots to plot_dir/<prefix>theory_<key>.png."""
  return {k: EXPERIMENTS[k](sweep, os.path.join(plot_dir, f"{prefix}theory_{k}.png")
                            if plot_dir else None) for k in keys}
