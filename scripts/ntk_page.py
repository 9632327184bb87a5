r"""Writes docs/ntk.md from the records of theory sweeps alone (ROOT/<arm>/seed<s>/record.json,
written by scripts/theory.py): experiments (a)-(f), each with the paper's prediction, its
control, the criterion fixed before measuring, every result with its Student-t interval over
seeds and n (the bootstrap beside it), the verdict read off the t interval, a plot (docs/ntk/),
the compute it took and the command of every run.

    python -m scripts.ntk_page                                   # --theory=runs/theory
    python -m scripts.ntk_page --theory=runs/theory,runs/theory_tiny --output=docs/ntk.md
"""
from __future__ import annotations

import os

import sys

from absl import flags

from ntk_analysis import judge
from ntkcl_jax import cli, evidence

IMG_DIR = "ntk"  # plots, next to the page


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return ", ".join(_fmt(x) for x in v)
  return str(v).replace("|", "\\|")


def table(rows, keys=None) -> list:
  if not rows:
    return ["(no rows)"]
  keys = keys or list(rows[0])
  out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  out += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
  return out


def _verdict(v) -> str:
  return {"holds": "**holds**", "fails": "**fails**", "inconclusive": "inconclusive",
          None: ""}[v]


def noise_note(f: dict) -> str:
  """'within noise' when the finding's t interval holds the value its criterion compares with
  (0, or the criterion's threshold: a difference that no seed count could tell from it)."""
  th = f.get("threshold") or 0.0
  lo, hi = f["lo"], f["hi"]
  if lo is None or hi is None or not lo <= th <= hi:
    return ""
  return "within noise" if th == 0 else f"within noise of {th:g}"


def findings_table(found) -> list:
  rows = [{"quantity": f["quantity"], "prediction": f["prediction"] or "(reported)",
           "estimate [t 95% interval] (n seeds)": f["text"], "verdict": _verdict(f["verdict"]),
           "note": "; ".join(x for x in (noise_note(f), evidence.few_seeds(f["n"]),
                                         f["bootstrap"]) if x)}
          for f in found]
  return table(rows)


def setting(base_rec: dict) -> str:
  """One sentence on the base config of a sweep."""
  c = base_rec["config"]
  d, m = c["data"], c["model"]
  ov = m.get("overrides", {})
  random = not m.get("checkpoint")
  per = d.get("max_per_class_train") or "all"
  return (f"{d['name']}, {d['num_classes']} classes in tasks of {d['increment']}, {per} "
          f"training images per class (subsample drawn per seed: "
          f"{bool(d.get('subsample_per_seed'))}), {c['optim']['epochs']} epochs, "
          f"{m['name']} at {m['image_size']} px" +
          (f" with {ov['num_layers']} blocks" if "num_layers" in ov else "") +
          (", **random frozen backbone: mechanics only, the kernels carry no image structure**"
           if random else f", pretrained backbone `{m['checkpoint']}`") +
          f"; method {c['method']['name']} ({c['method']['variant']}), dis_temp "
          f"{c['method']['dis_temp']:g}, reg_temp {c['method']['reg_temp']:g}, frozen sets "
          f"updated by {c['method'].get('frozen_update', 'ema')} (arms below change one of "
          f"these).")


def runs_section(sweep: judge.Sweep) -> list:
  """Every arm with its overrides, seeds and the command of its runs."""
  rows = []
  for arm, by_seed in sorted(sweep.arms().items(), key=lambda kv: (kv[0] != "base", kv[0])):
    s = min(by_seed)
    rec = by_seed[s]  # its command with the seed as a placeholder
    cmd = rec["command"].replace(f"--config.seed={s}", "--config.seed={seed}").replace(
        f"/seed{s} ", "/seed{seed} ")
    rows.append({"arm": arm, "seeds": ",".join(str(x) for x in sorted(by_seed)),
                 "parts": ", ".join(rec.get("parts", [])),
                 "train / measure s": f"{rec.get('train_seconds', 0):.0f} / "
                                      f"{rec.get('measure_seconds', 0):.0f}",
                 "command (then measure_run on its checkpoints)": f"`{cmd}`"})
  return table(rows)


def experiment_section(res: dict, img_prefix: str) -> list:
  lines = [f"### ({res['experiment']}) {res['name']}", "",
           f"- Prediction: {res['prediction']}.", f"- Control: {res['control']}.",
           f"- Criterion (fixed before measuring): {res['criterion']}.", ""]
  if res.get("missing"):
    return lines + [f"Not measured yet: {res['missing']}.", ""]
  lines += [f"Verdict: {verdict_text(res)}.", ""]
  lines += findings_table(res["findings"]) + [""]
  for name, rows in res["tables"].items():
    if name == "pairs" or not rows:  # the per-pair table is in the plot and the records
      continue
    lines += [f"{name.replace('_', ' ')}:", ""] + table(rows) + [""]
  if res.get("plot"):
    lines += [f"![({res['experiment']})]({img_prefix}{res['plot']})", ""]
  return lines


def verdict_text(res: dict) -> str:
  """The experiment's verdict, or its separate verdicts ((b): paper and code; (f): each part);
  (e) is a measurement."""
  if res["experiment"] == "e":
    return "none (a measurement)"
  parts = []
  if res.get("verdict") is not None:
    parts.append(_verdict(res["verdict"]))
  if res.get("code_verdict") is not None:
    parts.append(f"code-level predictions {_verdict(res['code_verdict'])}")
  for name, v in (res.get("verdicts") or {}).items():
    parts.append(f"{name}: {_verdict(v)}")
  return "; ".join(p for p in parts if p) or "see the rows"


def summary_detail(res: dict) -> str:
  """One cell for the summary table: how the experiment's criteria came out and its first
  criterion's estimate (for (e), its first measurement), so the table reads without the
  sections below."""
  if res.get("missing"):
    return _fmt(res["missing"])
  found = res["findings"]
  decided = [f for f in found if f["prediction"]]
  head = (decided or found or [None])[0]
  if head is None:
    return ""
  ns = sorted({f["n"] for f in found})
  seeds = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]}"
  first = f"{head['quantity']}: {head['text']}"
  if not decided:
    return _fmt(first)
  count = {v: sum(f["verdict"] == v for f in decided) for v in ("holds", "fails")}
  return _fmt(f"{len(decided)} criteria: {count['holds']} hold, {count['fails']} fail, "
              f"{len(decided) - count['holds'] - count['fails']} inconclusive ({seeds}); "
              f"first, {first}")


def nt_section(sweep: judge.Sweep) -> list:
  """The base runs' kernels at theta_T recomputed through neural-tangents (record part
  'nt_check'), against the JAX backend's kernels the experiments read."""
  rows = [{"seed": seed, "images": r["nt_check"]["n"],
           "max relative error": f"{r['nt_check']['max_rel_error']:.1e}",
           "Frobenius relative error": f"{r['nt_check']['frob_rel_error']:.1e}",
           "neural-tangents s": f"{r['nt_check']['seconds']:.0f}"}
          for seed, r in sorted(sweep.base().items()) if r.get("nt_check")]
  if not rows:
    return []
  return ["### neural-tangents on the same kernels", "",
          "The fused-view kernel at theta_T of each base run (the full NTK-CL readout: channel "
          "adapters, patch prompts, fusion, frozen set) computed once more through "
          "neural-tangents 0.6.5 (`empirical_ntk_fn`, implementation 1, via "
          "ntk_analysis/nt_compat.py), against the JAX backend's kernel the experiments read. "
          "The same check on the 12-block backbone: [ntk_nt_check.md](ntk_nt_check.md).", ""
          ] + table(rows) + [""]


def sweep_section(root: str, out_dir: str, keys: str = "abcdef") -> tuple[list, list]:
  """The page section of one sweep, and the plot files it wrote."""
  tag = os.path.basename(os.path.normpath(root))
  sweep = judge.Sweep.load(root)
  img_dir = os.path.join(out_dir, IMG_DIR)
  os.makedirs(img_dir, exist_ok=True)
  report = judge.judge_sweep(sweep, keys, img_dir, prefix=f"{tag}_")
  base = sweep.base()
  seeds = sorted({int(r["seed"]) for r in sweep.records})
  lines = [f"## Sweep `{root}`", ""]
  if not sweep.records:
    lines += ["No run of this sweep is recorded yet: every check below states its prediction, "
              "control and criterion, fixed before any run is read. `python -m scripts.theory` "
              "(README) trains and measures the runs; this page is regenerated from their "
              "records.", ""]
  if base:
    lines += [f"Setting: {setting(next(iter(base.values())))}", ""]
  cmds = sorted({r.get("sweep_command") for r in sweep.records if r.get("sweep_command")})
  if sweep.records and len(seeds) < evidence.MIN_SEEDS:
    lines += [f"**Only {len(seeds)} of the {evidence.MIN_SEEDS} seeds a verdict here rests on "
              f"are recorded: every verdict below is provisional.**", ""]
  if sweep.records:
    lines += [f"{len(sweep.records)} runs, seeds {seeds}; trained and measured by " +
              (", ".join(f"`{c}`" for c in cmds) if cmds else "`python -m scripts.theory`") +
              " (resumed over interruptions). Kernels: feature-sketch readouts of the trainable "
              "PEFT parameters over fixed, seeded per-task probe images (test transform), "
              f"{_first(sweep, 'n_per_task')} per task, {_first(sweep, 'probes')} probes.", ""]
  lines += ["| experiment | verdict | detail |", "|---|---|---|"]
  for k, r in report.items():
    lines.append(f"| ({k}) {r['name']} | "
                 f"{'not measured yet' if r.get('missing') else verdict_text(r)} | "
                 f"{summary_detail(r)} |")
  lines += [""]
  if sweep.records:
    lines += compute_section(sweep) + nt_section(sweep) + ["### Runs", ""]
    lines += runs_section(sweep) + [""]
  plots = []
  for r in report.values():
    lines += experiment_section(r, f"{IMG_DIR}/")
    if r.get("plot"):
      plots.append(r["plot"])
  return lines, plots


def compute_section(sweep: judge.Sweep) -> list:
  """The compute the sweep's records took and, from their mean per run, what the rest of its
  plan (the records' planned_runs) would take."""
  recs = sweep.records
  train = sum(r.get("train_seconds", 0) for r in recs)
  meas = sum(r.get("measure_seconds", 0) for r in recs)
  planned = max((int(r.get("planned_runs") or 0) for r in recs), default=0)
  lines = ["### Compute", "",
           f"{len(recs)} runs: {train / 3600:.1f} h of training and {meas / 3600:.1f} h of "
           f"measuring on 2 CPU cores, one run at a time (two side by side take as long as one "
           f"after the other)."]
  if recs and planned > len(recs):
    left = (planned - len(recs)) * (train + meas) / len(recs)
    lines[-1] += (f" The sweep's plan has {planned} runs: at the mean of those recorded, the "
                  f"{planned - len(recs)} still missing take about {left / 3600:.0f} h more.")
  lines[-1] += (" `python -m scripts.theory --plan` with the sweep's flags lists the runs still "
                "missing; rerunning the sweep command trains and measures them.")
  return lines + [""]


def _first(sweep, key):
  return next((r.get(key) for r in sweep.records if r.get(key) is not None), "?")


def page(roots, out_path: str, keys: str = "abcdef") -> str:
  out_dir = os.path.dirname(os.path.abspath(out_path))
  lines = ["# NTK theory checks (regenerated by `python -m scripts.ntk_page`)", "",
           "Experiments (a)-(f) of [ntk_theory.md](ntk_theory.md) §4, from the per-run records "
           "of `scripts/theory.py` (one per arm and seed; each run is an ordinary training run "
           "whose kernels were computed from its task-end checkpoints right after it finished). "
           "Every comparison is paired within a seed (same class order, image subsample, probe "
           "images and initialisation), summarised by its mean over seeds and its Student-t "
           f"{int(evidence.LEVEL * 100)}% interval (n - 1 degrees of freedom; statistics of "
           "task pairs, such as rank correlations, are computed within each seed first). A "
           "verdict is read off the t interval alone: **holds** when it "
           "lies on the predicted side of the criterion, **fails** when it lies on the other "
           "side, inconclusive otherwise (and always with one seed); 'within noise' where the "
           "interval holds the value the criterion compares with. A result backed by fewer than "
           f"{evidence.MIN_SEEDS} seeds says so. Definitions: ntk_theory.md §2.2; centred "
           "kernels are H K H with H = I - 11^T/n (the component every sample shares removed).",
           ""]
  written = []
  for root in roots:
    sec, plots = sweep_section(root, out_dir, keys)
    lines += sec
    written += plots
  img_dir = os.path.join(out_dir, IMG_DIR)
  for name in os.listdir(img_dir):  # plots of an earlier page that this one no longer shows
    if name.endswith(".png") and name not in written:
      os.remove(os.path.join(img_dir, name))
  with open(out_path, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  return out_path


def check_inputs(roots, output: str) -> None:
  """Every root is a directory (a sweep with no record yet gives a page of the checks' criteria
  alone) and the output directory exists: one clear error before writing."""
  if not roots:
    raise cli.InputError("--theory: give at least one sweep root (scripts/theory.py --root)")
  for root in roots:
    if not os.path.isdir(root):
      raise cli.InputError(f"--theory={root}: no record.json under it, nor such a directory "
                           f"(ROOT/<arm>/seed<s>/record.json); run python -m scripts.theory "
                           f"--root={root} first")
  if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise cli.InputError(f"--output={output}: directory {os.path.dirname(output)} does not exist")


def define_flags(fv) -> None:
  flags.DEFINE_list("theory", ["runs/theory"], "roots of scripts/theory.py sweeps", flag_values=fv)
  flags.DEFINE_string("output", "docs/ntk.md", "markdown page", flag_values=fv)
  flags.DEFINE_string("experiments", "abcdef", "which of (a)-(f) to show", flag_values=fv)


def _main(fv) -> int:
  bad = set(fv.experiments.replace(",", "")) - set("abcdef")
  if bad:
    raise cli.InputError(f"--experiments={fv.experiments}: unknown {sorted(bad)}; use a-f")
  check_inputs(fv.theory, fv.output)
  for root in fv.theory:
    if not judge.Sweep.load(root).records:
      print(f"ntk_page: no record under {root} yet: its section lists the checks and their "
            f"criteria only")
  print("wrote", page(fv.theory, fv.output, fv.experiments.replace(",", "")))
  return 0


main = cli.program(_main, define_flags, __doc__)


if __name__ == "__main__":
  sys.exit(main())
