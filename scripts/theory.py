r"""The theory sweep (docs/ntk_theory.md §4, experiments (a)-(f)): trains the runs the chosen
experiments need and keeps, of each, a small record of what the judgments read.

    python -m scripts.theory --config=configs/theory_dinov2s.py:size=56,per_class=200,test_per_class=200,epochs=2 \
        --config.data.subsample_per_seed=True --root=runs/theory
    python -m scripts.theory ... --plan     # list the runs (arm x seed) and which are missing
    python -m scripts.ntk_page              # docs/ntk.md from the records alone

Each run is ROOT/<arm>/seed<s>/ (ROOT: --root, default runs/theory), an ordinary training run of
the config plus the arm's overrides (scripts/grid.train_unless_finished; it resumes from its
checkpoints), checkpointed at task ends only. Right after it finishes, ntk_analysis.measure
computes the arm's parts from those checkpoints and ROOT/<arm>/seed<s>/record.json is written:
the essential fields of results.json, the measured parts, the config, the measurement settings
and the command (a few KB; runs/.gitignore keeps checkpoints, kernels and plots out of the
repository, so the records are what later runs find). The run's checkpoints are then deleted
(--keep_checkpoints keeps them). Rerunning skips every run whose record exists with the same
config and settings, and stops at a record of another config (delete that arm's directory, or use
another --root). Seeds default to 0-4.

Arms (an override equal to the config's value is dropped: an arm equal to the base is the base),
each with the parts measured of it (ntk_analysis/measure.py):
  base                         every part: (a) pairs, (c) views and gap, (d), (e), the reference of
                               (b), (c) and (f), and the neural-tangents cross-check (--nt_check)
  name=simplecil               gap: (a)'s control (SimpleCIL's drop for the same seed and pair)
                               and (c)'s at the base's N
  (b) dis_temp=0               pairs: the signed sum's zero-weight control
      dis_temp=w               pairs: the official signed-sum term, w in --dis_temps
      dis_temp=w,fix_orth=..   pairs: variant=corrected with only fix_orth on (the penalty), w in
                               --orth_weights and 0 (its own zero-weight control)
  (c) max_per_class_train=N    gap: N in --n_per_class, each with the base's SGD steps per task
                               (epochs scaled by the base's N / N), NTK-CL and SimpleCIL
  (f) reg_temp=r               tasks: r in --reg_temps (all below the stability bound)
      frozen_update=copy       tasks: the frozen set overwritten with the last task's values
Runs go seed by seed (every arm of seed 0, then seed 1, ...), so paired comparisons are complete
for the seeds done whenever the sweep is stopped.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

from absl import flags, logging
import jax

from ntk_analysis import judge
from ntk_analysis import measure
from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import results as results_lib
from ntkcl_jax import same_run
from ntkcl_jax import switches
from scripts import grid

SCHEMA = 2  # of record.json
DEFAULT_ROOT = os.path.join("runs", "theory")
# (b): the official weight 1e-4 and two far above it for the signed-sum term; the fix_orth
# penalty from a weight where its gradient is small beside the cross-entropies' up to one where it
# dominates them (the base run measures both scales: its grad_scale part).
DIS_TEMPS = (1e-4, 1e-2, 1e-1)
ORTH_WEIGHTS = (1e-2, 1e-1, 1.0)
# (f): the official 1e-3 and values up to a third of the stability bound (1 + momentum) / lr
# (95 at the theory config's lr 0.02 and momentum 0.9; plan() refuses values at or above it).
REG_TEMPS = (0.0, 1e-3, 1e-1, 1.0, 10.0, 30.0)
N_PER_CLASS = (25, 50, 100, 200)
SETTINGS = dict(measure.SETTINGS)
RESULT_KEYS = ("accuracy_matrix", "avg_incremental_accuracy", "last_accuracy", "forgetting",
               "backward_transfer", "learning_accuracy", "class_order", "wall_time_s",
               "versions")
BOOKKEEPING = {"train.checkpoint_every_steps": 0}  # task ends only; keep_checkpoints: run_config


def _node(c, key):
  node = c
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"override {key!r}: no such config key")
  return node, leaf


def _value_text(v) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def arm_name(overrides: Mapping[str, object]) -> str:
  """Directory name of an arm: 'base', or its overrides as leaf=value in key order."""
  return ",".join(f"{k.split('.')[-1]}={_value_text(v)}"
                  for k, v in sorted(overrides.items())) or "base"


def num_tasks(config) -> int:
  d = config.data
  return 1 + -(-(d.num_classes - d.init_cls) // d.increment)


def plan(config, experiments_: str = "abcdef", dis_temps: Sequence[float] = DIS_TEMPS,
         reg_temps: Sequence[float] = REG_TEMPS, n_per_class: Sequence[int] = N_PER_CLASS,
         nt_check: bool = True, orth_weights: Sequence[float] = ORTH_WEIGHTS) -> dict:
  """{arm: (overrides, parts)}: the arms the experiments need (module docstring), overrides
  equal to the config's value dropped, and the parts measured of each (`nt_check`: the base
  run's kernel at theta_T once more through neural-tangents)."""
  arms: dict = {}

  def add(overrides, parts):
    ov = {k: v for k, v in overrides.items() if getattr(*_node(config, k)) != v}
    name = arm_name(ov)
    have = set(arms[name][1]) if name in arms else set()
    arms[name] = (ov, tuple(p for p in measure.PARTS if p in have | set(parts)))

  add({}, [p for p in measure.PARTS if nt_check or p != "nt_check"])
  simple = {"method.name": "simplecil"}
  if "a" in experiments_ or "c" in experiments_:
    add(simple, ("gap",))
  if "b" in experiments_:
    add({"method.dis_temp": 0.0}, ("pairs",))
    for w in dis_temps:
      add({"method.dis_temp": float(w)}, ("pairs",))
    others_off = {f"method.{s}": False for s in switches.NAMES if s != "fix_orth"}
    for w in (0.0, *orth_weights):
      add({"method.dis_temp": float(w), "method.variant": "corrected", "method.fix_orth": True,
           **others_off}, ("pairs",))
  if "c" in experiments_:
    n0, e0 = int(config.data.max_per_class_train), int(config.optim.epochs)
    if n0 <= 0:
      raise cli.InputError("(c) needs the base's images per class (data.max_per_class_train > "
                           "0) to keep its SGD steps per task at every N")
    for n in n_per_class:
      ov = {"data.max_per_class_train": int(n),
            "optim.epochs": max(1, round(e0 * n0 / int(n)))}
      add(ov, ("gap",))
      add({**ov, **simple}, ("gap",))
  if "f" in experiments_:
    bound = judge.stability_bound({"optim.lr": config.optim.lr,
                                   "optim.momentum": config.optim.momentum})
    unstable = [r for r in reg_temps if r >= bound]
    if unstable:
      raise cli.InputError(f"--reg_temps {unstable} reach the stability bound (1 + momentum) / lr "
                           f"= {bound:.3g} of the L2 term; keep the grid below it")
    for r in reg_temps:
      add({"method.reg_temp": float(r)}, ("tasks",))
    add({"method.frozen_update": "copy"}, ("tasks",))
  return arms


def run_config(config, overrides: Mapping[str, object], seed: int):
  """The config of one run: the base config, the seed, the arm's overrides and the sweep's
  bookkeeping (every task-end checkpoint kept)."""
  c = config.copy_and_resolve_references()
  for key, value in {"seed": seed, **dict(overrides), **BOOKKEEPING}.items():
    node, leaf = _node(c, key)
    node[leaf] = value
  c.train.keep_checkpoints = max(int(c.train.keep_checkpoints), num_tasks(c) + 1)
  return c


def record_path(root: str, arm: str, seed: int) -> str:
  return os.path.join(root, arm, f"seed{seed}", "record.json")


def existing_record(path: str, config, settings: Mapping, parts: Sequence[str]
                    ) -> Optional[dict]:
  """The record at `path` if it is one of this run (same config up to bookkeeping, same
  measurement settings, every part measured); None if there is none; cli.InputError if it is a
  record of something else (nothing is overwritten)."""
  if not os.path.exists(path):
    return None
  where = os.path.dirname(path)
  try:
    with open(path) as f:
      rec = json.load(f)
  except ValueError as e:
    raise cli.InputError(f"{path} is not JSON ({e}); delete it to rerun that run") from e
  diffs = same_run.differences(rec.get("config", {}), config)
  if diffs:
    raise cli.InputError(f"{path} is the record of another config ({same_run.describe(diffs)}); "
                         f"use another --root, or delete {where} to rerun it")
  if rec.get("schema") != SCHEMA or rec.get("settings") != dict(settings):
    raise cli.InputError(f"{path} was measured with settings {rec.get('settings')} (schema "
                         f"{rec.get('schema')}), not {dict(settings)} (schema {SCHEMA}); rerun "
                         f"with those flags, or delete {where} to retrain and remeasure it")
  if not set(parts) <= set(rec.get("parts", ())):
    if not os.path.isdir(os.path.join(where, "checkpoints")):
      raise cli.InputError(f"{path} lacks the kernel parts {sorted(set(parts) - set(rec['parts']))}"
                           f" and its checkpoints are gone; delete {where} to retrain it")
    return None
  return rec


def command(spec: str, base_overrides: Sequence[str], workdir: str, run_overrides: Mapping,
            seed: int, keep: int) -> str:
  """The launcher command that trains the same run (then measure_run reads its checkpoints)."""
  ov = list(base_overrides) + [f"--config.seed={seed}"] + [
      f"--config.{k}={_value_text(v)}" for k, v in sorted(run_overrides.items())] + [
          "--config.train.checkpoint_every_steps=0", f"--config.train.keep_checkpoints={keep}"]
  return " ".join(grid.launch_command(spec, workdir, ov))


def run_arm(config, root: str, arm: str, overrides: Mapping[str, object], seed: int,
            parts: Sequence[str], *, settings: Mapping = SETTINGS, spec: str = "",
            base_overrides: Sequence[str] = (), sweep_command: str = "",
            keep_checkpoints: bool = False, planned_runs: int = 0,
            log: Callable[[str], None] = print, **ntk_kwargs) -> dict:
  """One run of the sweep: its record, read back if it exists, else trained (or resumed, or
  reused), measured, written and its checkpoints deleted. `planned_runs`: the size of the sweep
  it belongs to, kept in the record for the page's compute plan."""
  c = run_config(config, overrides, seed)
  path = record_path(root, arm, seed)
  rec = existing_record(path, c, settings, parts)
  if rec is not None:
    return rec
  wd = os.path.dirname(path)
  t0 = time.time()
  res = grid.train_unless_finished(c, wd, progress=False, log=log)
  t1 = time.time()
  log(f"measuring {wd} ({', '.join(parts)})")
  kern = measure.measure_run(wd, parts, n_per_task=settings["n_per_task"],
                             probes=settings["probes"], lin_test=settings["lin_test"], log=log,
                             **ntk_kwargs)
  rec = {"schema": SCHEMA, "arm": arm, "seed": int(seed), "overrides": dict(overrides),
         "settings": dict(settings), "config": json.loads(c.to_json_best_effort()),
         "results": {k: res.get(k) for k in RESULT_KEYS},
         "command": command(spec or "CONFIG", base_overrides, wd, overrides, seed,
                            c.train.keep_checkpoints),
         "sweep_command": sweep_command, "planned_runs": int(planned_runs),
         "train_seconds": round(t1 - t0, 1), **kern}
  results_lib.atomic_write_json(path, results_lib.jsonable(rec))
  if not keep_checkpoints:
    for sub in ("checkpoints", "ntk", "tb"):
      shutil.rmtree(os.path.join(wd, sub), ignore_errors=True)
  log(f"wrote {path}")
  return rec


def run_all(config, root: str, seeds: Sequence[int] = (0,), experiments_: str = "abcdef", *,
            dis_temps: Sequence[float] = DIS_TEMPS, reg_temps: Sequence[float] = REG_TEMPS,
            n_per_class: Sequence[int] = N_PER_CLASS, settings: Mapping = SETTINGS,
            spec: str = "", base_overrides: Sequence[str] = (), sweep_command: str = "",
            keep_checkpoints: bool = False, plan_only: bool = False, nt_check: bool = True,
            orth_weights: Sequence[float] = ORTH_WEIGHTS,
            log: Callable[[str], None] = print, **ntk_kwargs) -> list:
  """Every run the chosen experiments need, seed by seed: the records (plan_only: the list of
  (arm, seed, parts, done) without training anything)."""
  arms = plan(config, experiments_, dis_temps, reg_temps, n_per_class, nt_check, orth_weights)
  out = []
  for seed in seeds:
    for arm, (ov, parts) in arms.items():
      if plan_only:
        c = run_config(config, ov, seed)
        done = existing_record(record_path(root, arm, seed), c, settings, parts) is not None
        out.append((arm, seed, parts, done))
        continue
      out.append(run_arm(config, root, arm, ov, seed, parts, settings=settings, spec=spec,
                         base_overrides=base_overrides, sweep_command=sweep_command,
                         keep_checkpoints=keep_checkpoints,
                         planned_runs=len(arms) * len(seeds), log=log, **ntk_kwargs))
  return out


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache: the grid's runs share shapes, so later runs skip most compiles."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def define_flags(fv) -> None:
  """The CLI's flags (the base config of every run is --config=FILE[:arg] with --config.KEY=VALUE
  overrides, default configs/tiny.py:data=digits)."""
  def define(kind, name, default, help_text):
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=fv)
  define("string", "root", DEFAULT_ROOT, "directory of the runs and their records")
  define("list", "seeds", ["0", "1", "2", "3", "4"], "seeds of every arm")
  define("string", "experiments", "a,b,c,d,e,f", "which of a-f (letters, commas optional)")
  define("list", "dis_temps", [_value_text(w) for w in DIS_TEMPS],
         "(b): positive weights of the official signed-sum term")
  define("list", "orth_weights", [_value_text(w) for w in ORTH_WEIGHTS],
         "(b): positive weights of the fix_orth penalty")
  define("list", "reg_temps", [_value_text(r) for r in REG_TEMPS],
         "(f): reg_temp values, below the stability bound (1 + momentum) / lr")
  define("list", "n_per_class", [str(n) for n in N_PER_CLASS],
         "(c): training images per class (at least 2 values)")
  define("integer", "n_per_task", SETTINGS["n_per_task"], "probe images per task of the kernels")
  define("integer", "probes", SETTINGS["probes"], "random probes of the feature sketch")
  define("integer", "lin_test", SETTINGS["lin_test"],
         "(d): test images per task the linearised and the real run are compared on")
  define("bool", "plan", False, "list the runs (arm x seed) and which records exist; train "
         "nothing")
  define("bool", "keep_checkpoints", False, "keep each run's checkpoints after its record")
  define("bool", "nt_check", True, "recompute each base run's kernel at theta_T through "
         "neural-tangents (needs the `ntk` extra)")
  define("bool", "compilation_cache", False, "persistent XLA cache under ROOT/.jax_cache")
  define("float", "memory_limit_gb", 0, "memory budget of one kernel in GiB (0: the default of "
         "ntk_analysis.kernel_memory)")


def _main(fl, config, config_spec, config_overrides) -> int:
  logging.set_verbosity(logging.WARNING)
  if not fl.root:
    raise cli.InputError("--root is empty: give the directory of the runs and their records")
  if os.path.exists(fl.root) and not os.path.isdir(fl.root):
    raise cli.InputError(f"--root={fl.root} is a file, not a directory")
  exps = fl.experiments.replace(",", "")
  bad = set(exps) - set("abcdef")
  if bad or not exps:
    raise cli.InputError(f"--experiments={fl.experiments}: unknown {sorted(bad)}; use letters "
                         "a-f")
  try:
    seeds = [int(s) for s in fl.seeds]
    n_per_class = [int(n) for n in fl.n_per_class]
    dis_temps, reg_temps = [float(w) for w in fl.dis_temps], [float(r) for r in fl.reg_temps]
    orth_weights = [float(w) for w in fl.orth_weights]
  except ValueError as e:
    raise cli.InputError(f"--seeds / --n_per_class need integers and --dis_temps / --reg_temps / "
                         f"--orth_weights numbers ({e})")
  if "c" in exps and len(set(n_per_class)) < 2:
    raise cli.InputError("--n_per_class needs at least 2 values for the slope of (c)")
  settings = {"n_per_task": fl.n_per_task, "probes": fl.probes, "lin_test": fl.lin_test}
  spec, base_overrides = config_spec, config_overrides
  sweep_command = "python -m scripts.theory " + " ".join(sys.argv[1:])
  config.train.mesh_data = 1
  kw = {}
  if fl.memory_limit_gb > 0:
    kw["memory_limit"] = int(fl.memory_limit_gb * 2**30)
  if fl.plan:
    rows = run_all(config, fl.root, seeds, exps, dis_temps=dis_temps, reg_temps=reg_temps,
                   n_per_class=n_per_class, settings=settings, plan_only=True,
                   nt_check=fl.nt_check, orth_weights=orth_weights)
    for arm, seed, parts, done in rows:
      print(f"{'done   ' if done else 'missing'}  {arm:45s} seed {seed}  ({', '.join(parts)})")
    arms = sorted({r[0] for r in rows})
    print(f"{len(arms)} arms x {len(seeds)} seeds = {len(rows)} runs; "
          f"{sum(not r[3] for r in rows)} missing under {fl.root}")
    return 0
  if fl.compilation_cache:
    enable_compilation_cache(os.path.join(fl.root, ".jax_cache"))
  os.makedirs(fl.root, exist_ok=True)
  recs = run_all(config, fl.root, seeds, exps, dis_temps=dis_temps, reg_temps=reg_temps,
                 n_per_class=n_per_class, settings=settings, spec=spec,
                 base_overrides=base_overrides, sweep_command=sweep_command,
                 keep_checkpoints=fl.keep_checkpoints, nt_check=fl.nt_check,
                 orth_weights=orth_weights, **kw)
  print(f"{len(recs)} records under {fl.root}; the page: python -m scripts.ntk_page "
        f"--theory={fl.root}")
  return 0


main = cli.program(_main, define_flags, __doc__,
                   take=config_files.take_config("configs/tiny.py:data=digits"))


if __name__ == "__main__":
  sys.exit(main())
