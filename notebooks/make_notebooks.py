"""Writes the Colab notebooks of notebooks/ (run it after editing the cells below).

    python notebooks/make_notebooks.py

Each notebook starts with an install cell (Colab: clone + `bash install.sh`; elsewhere a no-op),
then works at the scale set by NTKCL_NB_SCALE: 'tiny' (CI, CPU: a random tiny ViT on synthetic
images, seconds) or 'demo' (the real DINOv2-S/14 on Imagenette/CIFAR-10, minutes on CPU, GPU
recommended). CI executes both notebooks at tiny scale (tests/test_notebooks.py).
"""
import os

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = """# Install (Colab: clones the project and installs the pinned stack; restart the runtime after
# the first run so the pinned jax is the one imported). Elsewhere this cell does nothing.
import os, sys
if "google.colab" in sys.modules and not os.path.exists("ntkcl-jax"):
    !git clone https://github.com/ntkcl-jax/ntkcl-jax.git && cd ntkcl-jax && bash install.sh
    sys.path.insert(0, "ntkcl-jax")
SCALE = os.environ.get("NTKCL_NB_SCALE", "tiny")   # 'tiny' (CPU, seconds) or 'demo' (real images)
print("scale:", SCALE)"""

SETUP = """import os, sys, tempfile, json
import numpy as np
import jax
repo = os.path.abspath(os.path.join(os.getcwd(), "..")) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, repo)
from ntkcl_jax import config_files, train
print(jax.devices())"""

TRAIN = """# A class-incremental run: the tiny config (CPU fallback) or the real-image demo.
cfg_file = "tiny.py" if SCALE == "tiny" else "demo.py"
config = config_files.load_config_file(os.path.join(repo, "configs", cfg_file))
config.train.mesh_data = 1
workdir = os.environ.get("NTKCL_NB_WORKDIR") or tempfile.mkdtemp(prefix="ntkcl_nb_")
results = train.run(config, workdir, progress=False)
print("average incremental accuracy", results["avg_incremental_accuracy"],
      "last accuracy", results["last_accuracy"])"""

NTK = """# Empirical NTKs over the trainable PEFT parameters, one joint kernel per view, sliced by task.
from ntk_analysis import analyse
report = analyse.analyse(workdir, n_per_task=4 if SCALE == "tiny" else 32, num_probes=8,
                         views=("fused", "channel", "patch", "all"))
for pair, m in report["views"]["fused"]["pairs"].items():
    print(f"tasks {pair}: inter-task |K_st| = {m['frob']:.3g}, alignment rho = {m['rho']:.3f}")"""

SHOW = """from IPython.display import Image, display
for name in ("kernel_fused.png", "alignment_fused.png", "spectra_fused.png"):
    display(Image(os.path.join(workdir, "ntk", name)))"""

BLOCKS = """# The intra-task K(X_t, X_t) and inter-task K(X_t, X_s) blocks of the saved joint kernel.
from ntk_analysis import joint, metrics
jk = joint.JointKernel.load(os.path.join(workdir, "ntk", "kernel_fused.npz"))
for t in jk.tasks:
    print(f"task {t}: effective rank of K(X_t, X_t) = {metrics.effective_rank(jk.block(t, t)):.2f}")
print("K(X_0, X_1) shape:", jk.block(0, 1).shape)"""

CHECKS = """# Theory checks on this run, each with the paper's prediction beside the measurement.
for key in ("check_a_overlap_vs_forgetting", "check_c_views"):
    c = report.get(key)
    if c:
        print(key, "\\n  prediction:", c.get("prediction"), "\\n  holds:", c.get("holds"))
        display(__import__("pandas").DataFrame(c["table"]))"""

COMPARE = """# (b) the orthogonality term: two runs with dis_temp 1e-4 (the default) and 1e-3, each with
# kernels at every task end (computed from the saved task-end checkpoints).
from ntk_analysis import experiments
from scripts import theory
orth_root = workdir + "_orth"
runs = {theory.train_run(config, orth_root, ov, config.seed, {"train.checkpoint_every_steps": 0},
                         n_per_task=4 if SCALE == "tiny" else 16): ov
        for ov in ({}, {"method.dis_temp": 1e-3})}
out = experiments.orthogonality(runs)
print("prediction:", out["prediction"], "\\nmeasured:", out["measured"])
__import__("pandas").DataFrame(out["table"])"""


LAZY = """# (d) Lazy regime: a run checkpointed at every step; kernel distance to each task's starting
# kernel and the linearisation error between consecutive checkpoints.
from IPython.display import Image, display
from ntk_analysis import analyse, experiments
from scripts import theory
lazy_root = workdir + "_lazy"
wd = theory.train_run(config, lazy_root, {"train.checkpoint_every_steps": 1}, config.seed)
d = experiments.lazy_regime(analyse.every_checkpoint(wd, n_per_task=2 if SCALE == "tiny" else 8),
                            plot_path=os.path.join(lazy_root, "theory_d.png"))
print("prediction:", d["prediction"], "\\nmeasured:", d["measured"], "\\nholds:", d["holds"])
display(Image(os.path.join(lazy_root, "theory_d.png")))"""

SWEEPS = """# (b), (c), (f) and the rest as sweeps of training runs: one command, resumable, tiny or paper
# scale by the config (this cell only prints it; each sweep trains 6-9 runs).
print("python scripts/theory.py --config=configs/tiny.py:data=digits --root=workdirs/theory_tiny")
print("python scripts/theory.py --config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k --root=workdirs/theory_b16 --seeds=0,1,2")"""


def write(name, cells):
  nb = nbf.v4.new_notebook()
  nb.cells = [nbf.v4.new_markdown_cell(cells[0])] + [nbf.v4.new_code_cell(c) for c in cells[1:]]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nbf.write(nb, os.path.join(HERE, name))


if __name__ == "__main__":
  write("ntk_of_a_run.ipynb", [
      "# Intra- and inter-task NTKs of an NTK-CL run\n\nTrains a class-incremental run (tiny on "
      "CPU, or the real-image demo), then computes empirical NTKs over the trainable PEFT "
      "parameters with the frozen backbone closed over, sliced into K(X_t, X_t) and K(X_t, X_s).",
      INSTALL, SETUP, TRAIN, NTK, SHOW, BLOCKS])
  write("theory_checks.ipynb", [
      "# Theory checks: the paper's generalisation-gap story against training\n\n(a) inter-task "
      "overlap vs forgetting, (b) the orthogonality term's effect, (c) one view vs three views, "
      "(d) the lazy-regime check, (e) per-task spectra (docs/ntk_theory.md §4); the sweeps of "
      "(b), (c) and (f) over many runs are `python scripts/theory.py`.",
      INSTALL, SETUP, TRAIN, NTK, CHECKS, COMPARE, LAZY, SWEEPS])
  print("wrote notebooks")
