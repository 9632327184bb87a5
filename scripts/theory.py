r"""The theory sweep: trains the runs experiments (a)-(f) need, computes their task-end kernels from
the saved checkpoints, and writes each experiment's table, verdict and plot (ntk_analysis.experiments).

    python scripts/theory.py --config=configs/tiny.py:data=digits --root=DIR \
        [--seeds=0,1,2] [--experiments=a,b,c,d,e,f] [--config.KEY=VALUE ...]

Every run is an ordinary training run (scripts/grid.train_unless_finished) named after its
overrides, so reruns reuse finished runs and resume unfinished ones; runs shared by experiments are
trained once. Each keeps its task-end checkpoints (train.keep_checkpoints raised to fit), from
which `ntk_analysis.analyse.task_end_kernels` computes fused-view joint kernels into
WORKDIR/ntk/task<t>/. The same command at paper scale takes a paper config on a GPU. Writes
DIR/theory.json and DIR/theory_<x>.png.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

from absl import app, flags, logging
import jax
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as `python scripts/theory.py`: `scripts.*` from the repo root

from ntk_analysis import analyse, experiments  # noqa: E402
from ntkcl_jax import cli  # noqa: E402
from ntkcl_jax import results as results_lib  # noqa: E402
from scripts import grid  # noqa: E402

ORTH_GRID = [{"method.dis_temp": d, **sign} for sign in
             ({}, {"method.variant": "corrected", "method.fix_nce_sign": True})
             for d in (0.0, 1e-4, 1e-3)]
REG_TEMPS = (0.0, 1e-4, 1e-3, 1e-2)
N_PER_TASK = 8  # images per task in the task-end kernels
PROBES = 8  # probes of their feature sketch


def run_name(overrides: Mapping[str, object], seed: int) -> str:
  """Directory name of a run: its overrides in sorted order, then the seed."""
  parts = [f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())]
  return ("_".join(parts) or "base") + f"_seed{seed}"


def _node(c, key):
  node = c
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"override {key!r}: no such config key")
  return node, leaf


def num_tasks(config) -> int:
  d = config.data
  return 1 + -(-(d.num_classes - d.init_cls) // d.increment)


def max_checkpoints(config) -> int:
  """Checkpoints of a run saved at every step: steps plus task ends (bounds keep_checkpoints,
  which the launcher's free-disk check multiplies by the checkpoint size)."""
  d, o = config.data, config.optim
  per_task = (d.max_per_class_train or 1000) * max(d.init_cls, d.increment)
  return num_tasks(config) * (o.epochs * -(-per_task // o.batch_size) + 1) + 2


def train_run(config, root: str, overrides: Mapping[str, object], seed: int,
              extra_train: Optional[Mapping[str, object]] = None, n_per_task: int = N_PER_TASK,
              log=print) -> str:
  """Trains (or resumes, or reuses) one run with dotted-key overrides, keeping its task-end
  checkpoints, and computes its task-end kernels; returns its workdir."""
  # overrides equal to the config's value name the same run as no override (trained once)
  overrides = {k: v for k, v in overrides.items() if getattr(*_node(config, k)) != v}
  wd = os.path.join(root, run_name(overrides, seed))
  c = config.copy_and_resolve_references()
  for key, value in {"seed": seed, **dict(overrides), **dict(extra_train or {})}.items():
    node, leaf = _node(c, key)
    node[leaf] = value
  keep = max_checkpoints(c) if c.train.checkpoint_every_steps else num_tasks(c) + 1
  c.train.keep_checkpoints = max(int(c.train.keep_checkpoints), keep)
  grid.train_unless_finished(c, wd, progress=False, log=log)
  analyse.task_end_kernels(wd, n_per_task=n_per_task, num_probes=PROBES, log=lambda *_: None)
  return wd


def run_all(config, root: str, seeds: Sequence[int] = (0,), experiments_: str = "abcdef",
            n_per_class: Sequence[int] = (), reg_temps: Sequence[float] = REG_TEMPS,
            n_per_task: int = N_PER_TASK, log=print) -> dict:
  """Trains what the chosen experiments need and returns {key: result}; ROOT/theory.json is
  rewritten after each experiment, so an interrupted sweep keeps what it finished."""
  os.makedirs(root, exist_ok=True)
  out: dict = {}
  quick = {"train.checkpoint_every_steps": 0}  # sweep runs checkpoint at task ends only
  png = lambda k: os.path.join(root, f"theory_{k}.png")  # noqa: E731

  def save():
    results_lib.atomic_write_json(os.path.join(root, "theory.json"),
                                  results_lib.jsonable({k: out[k] for k in sorted(out)}))

  def grid_runs(grid_, n=lambda ov: n_per_task):
    return {train_run(config, root, ov, s, quick, n(ov), log=log): ov
            for ov in grid_ for s in seeds}

  base_runs = [train_run(config, root, {}, s, quick, n_per_task, log=log) for s in seeds]
  if "a" in experiments_:
    out["a"] = experiments.overlap_vs_forgetting(base_runs, png("a"))
  if "e" in experiments_:
    out["e"] = experiments.spectra_and_drift(base_runs[0], png("e"))
  save()
  if "b" in experiments_:
    out["b"] = experiments.orthogonality(grid_runs(ORTH_GRID), png("b"))
    save()
  if "d" in experiments_:
    wd = train_run(config, root, {"train.checkpoint_every_steps": 1}, seeds[0],
                   n_per_task=n_per_task, log=log)
    out["d"] = experiments.lazy_regime(analyse.every_checkpoint(wd), png("d"))
    save()
  if "f" in experiments_:
    grid_ = [{"method.reg_temp": float(r), "method.frozen_sets": f}
             for f in (1, 0) for r in reg_temps]
    out["f"] = experiments.regularisation_ema(grid_runs(grid_), png("f"))
    save()
  if "c" in experiments_:
    full = int(config.data.max_per_class_train)
    ns = list(n_per_class) or [max(1, full // 4), max(1, full // 2), full]
    grid_ = [{"method.name": m, "data.max_per_class_train": n}
             for m in ("channel", "patch", "ntkcl") for n in ns]
    # kernels of at most as many images per task as the smallest task has
    runs_ = grid_runs(grid_, lambda ov: min(n_per_task, int(ov["data.max_per_class_train"]) *
                                            int(config.data.increment)))
    views = analyse.analyse(base_runs[0], n_per_task=8, num_probes=4,
                            views=("fused", "channel", "all"),
                            out_dir=os.path.join(base_runs[0], "ntk", "views"),
                            log=lambda *_: None, plot=False)["check_c_views"]
    out["c"] = experiments.sample_size_and_views(runs_, views, png("c"))
    save()
  return out


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache: the grid's runs share shapes, so later runs skip most compiles."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _define_flags() -> None:
  """Registers the CLI's flags (only when run as a program)."""
  config_flags.DEFINE_config_file("config", "configs/tiny.py:data=digits",
                                  "base config of every run (overrides: --config.KEY=VALUE)")
  flags.DEFINE_string("root", "", "directory of the runs, theory.json and the plots")
  flags.DEFINE_list("seeds", ["0"], "seeds of every run")
  flags.DEFINE_string("experiments", "abcdef", "which of a-f to run")
  flags.DEFINE_integer("n_per_task", N_PER_TASK, "images per task in the task-end kernels")
  flags.DEFINE_bool("compilation_cache", False, "persistent XLA cache under ROOT/.jax_cache "
                    "(later runs of the grid skip most compiles; XLA logs each cache load)")
  flags.DEFINE_list("reg_temps", [str(r) for r in REG_TEMPS], "(f): reg_temp values")
  flags.DEFINE_list("n_per_class", [], "(c): training images per class (default: 1/4, 1/2, 1 "
                    "of the config's data.max_per_class_train)")


def main(_) -> None:
  fl = flags.FLAGS
  if not fl["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not fl.root:
    raise app.UsageError("--root is required (the directory for the runs, theory.json and plots)")
  if os.path.exists(fl.root) and not os.path.isdir(fl.root):
    raise app.UsageError(f"--root={fl.root} is a file, not a directory")
  bad = set(fl.experiments) - set("abcdef")
  if bad:
    raise app.UsageError(f"--experiments={fl.experiments}: unknown {sorted(bad)}; use letters a-f")
  try:
    seeds, n_per_class = [int(s) for s in fl.seeds], [int(n) for n in fl.n_per_class]
    reg_temps = [float(r) for r in fl.reg_temps]
  except ValueError as e:
    raise app.UsageError(f"--seeds / --n_per_class need integers and --reg_temps numbers ({e})")
  fl.config.train.mesh_data, fl.config.train.mesh_model = 1, 1
  if fl.compilation_cache:
    enable_compilation_cache(os.path.join(fl.root, ".jax_cache"))
  os.makedirs(fl.root, exist_ok=True)
  with open(os.path.join(fl.root, "command.txt"), "w") as f:  # for docs/ntk.md
    f.write("python scripts/theory.py " + " ".join(sys.argv[1:]) + "\n")
  out = run_all(fl.config, fl.root, seeds, fl.experiments, n_per_class, reg_temps, fl.n_per_task)
  for k, r in sorted(out.items()):
    print(f"({k}) prediction: {r['prediction']}\n    measured: {r['measured']}\n"
          f"    holds: {r['holds']}")
  print("wrote", os.path.join(fl.root, "theory.json"))


if __name__ == "__main__":
  _define_flags()
  app.run(cli.guard(main), flags_parser=cli.parse_flags)
