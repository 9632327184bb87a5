"""Writes the Colab notebooks of notebooks/ (run it after editing the cells below).

    python notebooks/make_notebooks.py

Each notebook starts with an install cell: it installs the package with `bash install.sh
<cpu|cuda|tpu>` from a checkout (NTKCL_SOURCE: a folder or a git URL; by default the checkout the
notebook is in), for the accelerator it finds, unless ntkcl-jax is importable already, and prints
the backend JAX got. It runs from any working directory (Colab: /content); the notebook then
works at the scale set by NTKCL_NB_SCALE: 'tiny' (CI, CPU: a random tiny ViT on synthetic
images, seconds) or 'demo' (the real DINOv2-S/14 on Imagenette/CIFAR-10, minutes on CPU, GPU
recommended). CI executes both notebooks at tiny scale from a temporary directory outside the
repository (tests/test_notebooks.py).
"""
import os

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = """# Installs ntkcl-jax for this runtime (CPU, GPU found by nvidia-smi, or TPU), then prints the
# backend JAX got. NTKCL_SOURCE: a checkout of the project (a folder with install.sh) or a git URL,
# cloned into ./ntkcl-jax (/content/ntkcl-jax on Colab); empty: the checkout this notebook is in.
# Nothing is installed when ntkcl-jax (with the runtime's JAX plugin) is importable already.
import os
NTKCL_SOURCE = os.environ.get("NTKCL_NB_SOURCE", "")  # a folder, or the git URL of your own clone

import glob, importlib, importlib.metadata, importlib.util, shutil, subprocess, sys


def runtime():
    # 'tpu', 'cuda' or 'cpu': the accelerator this runtime offers (install.sh's extra)
    if (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
            or any(os.environ.get(k) for k in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"))):
        return "tpu"
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"],
                                                     capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


def is_checkout(path):
    return all(os.path.exists(os.path.join(path, f)) for f in ("install.sh", "setup.py", "ntkcl_jax"))


def installed_checkout():
    # The checkout an importable ntkcl_jax comes from (an editable install): its path; "" if
    # installed otherwise (site-packages); None if not importable.
    spec = importlib.util.find_spec("ntkcl_jax")
    if spec is None:
        return None
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    return root if is_checkout(root) else ""


def find_source(source):
    # A local checkout to run install.sh in: NTKCL_SOURCE, a clone of it, or the notebook's own.
    if source and os.path.isdir(source):
        if not is_checkout(source):
            raise RuntimeError(f"NTKCL_SOURCE={source!r} is a folder but not an ntkcl-jax checkout "
                               "(no install.sh / setup.py / ntkcl_jax/ in it)")
        return os.path.abspath(source)
    if source:
        if not ("://" in source or source.startswith("git@") or source.endswith(".git")):
            raise RuntimeError(f"NTKCL_SOURCE={source!r} is neither a folder nor a git URL")
        dest = os.path.abspath("ntkcl-jax")
        if not is_checkout(dest):
            r = subprocess.run(["git", "clone", "--depth", "1", source, dest],
                               capture_output=True, text=True)
            if r.returncode != 0:
                why = "; ".join(l for l in r.stderr.splitlines() if l and not l.startswith("Cloning"))
                raise RuntimeError(f"git clone {source} failed: {why[-800:]}")
        return dest
    for cand in (os.path.dirname(os.getcwd()), os.getcwd(), os.path.abspath("ntkcl-jax")):
        if is_checkout(cand):
            return cand
    raise RuntimeError("ntkcl-jax is not installed and no checkout was found: set NTKCL_SOURCE at "
                       "the top of this cell to a checkout of the project (e.g. uploaded to "
                       "/content/ntkcl-jax or on Google Drive) or to its git URL (the project has "
                       "no public URL yet)")


PLUGINS = {"cpu": (), "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin"), "tpu": ("libtpu",)}
RUNTIME = runtime()
have = installed_checkout()
if have is not None and (not PLUGINS[RUNTIME] or any(importlib.util.find_spec(p) for p in PLUGINS[RUNTIME])):
    print(f"ntkcl-jax is installed ({have or 'not from a checkout'}); skipping the install")
else:
    src = have or find_source(NTKCL_SOURCE)
    # Modules this kernel has imported already cannot be upgraded in place.
    dists = {"numpy": "numpy", "jax": "jax", "PIL": "pillow", "scipy": "scipy", "pandas": "pandas"}
    before = {m: importlib.metadata.version(d) for m, d in dists.items() if m in sys.modules}
    print(f"installing ntkcl-jax from {src} for a {RUNTIME} runtime (a few minutes) ...", flush=True)
    # A regular (not editable) install: it lands in site-packages, which this kernel already
    # searches, so the package imports without a restart.
    r = subprocess.run(["bash", os.path.join(src, "install.sh"), RUNTIME],
                       env=dict(os.environ, PYTHON=sys.executable, NTKCL_EDITABLE="0"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print("\\n".join(r.stdout.splitlines()[-15:]))
    if r.returncode != 0:
        raise RuntimeError(f"bash {src}/install.sh {RUNTIME} failed (exit {r.returncode}); its "
                           "output is above")
    importlib.invalidate_caches()
    changed = [f"{d} {before[m]} -> {importlib.metadata.version(d)}" for m, d in dists.items()
               if m in before and importlib.metadata.version(d) != before[m]]
    if changed:
        raise RuntimeError(f"the install changed {changed}, already imported by this kernel: "
                           "restart it (Colab: Runtime > Restart session) and run this cell again "
                           "(it then skips the install)")
    if importlib.util.find_spec("ntkcl_jax") is None:
        raise RuntimeError("ntkcl-jax was installed but this kernel cannot import it: restart the "
                           "kernel (Colab: Runtime > Restart session) and run this cell again")

import jax
BACKEND = jax.default_backend()
print(f"JAX {jax.__version__}: backend {BACKEND!r}, devices {jax.devices()}")
if RUNTIME != "cpu" and BACKEND == "cpu":
    import warnings
    msg = (f"THIS IS A {RUNTIME.upper()} RUNTIME BUT JAX RUNS ON CPU: everything below will be "
           f"slow. Check the install output above (bash install.sh {RUNTIME}); restarting the "
           "kernel helps when a CPU jax was imported before the install.")
    print("!" * 100 + "\\n" + msg + "\\n" + "!" * 100)
    warnings.warn(msg)
SCALE = os.environ.get("NTKCL_NB_SCALE", "tiny")   # 'tiny' (CPU, seconds) or 'demo' (real images)
print("scale:", SCALE)"""

SETUP = """import os, tempfile, json
import numpy as np
import jax
from ntkcl_jax import config_files, train
print("configs:", config_files.CONFIG_DIR)   # the installed package's own (ntkcl_jax.configs)
print(jax.devices())"""

TRAIN = """# A class-incremental run: the tiny config (CPU fallback) or the real-image demo.
cfg_file = "tiny.py" if SCALE == "tiny" else "demo.py"
config = config_files.load("configs/" + cfg_file)
config.train.mesh_data = 1
config.train.checkpoint_every_steps, config.train.keep_checkpoints = 0, 10  # every task's end kept
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

COMPARE = """# (b) the orthogonality term: the run above (dis_temp 1e-4) against its zero-weight control
# (dis_temp 0, nothing else changed), each measured from its task-end checkpoints
# (ntk_analysis.measure). One seed: every verdict is 'inconclusive'; the sweep over seeds is the
# command printed in the last cell.
from ntk_analysis import judge, measure
settings = dict(n_per_task=4, probes=4, lin_test=6) if SCALE == "tiny" else measure.SETTINGS


def measured_record(cfg, wd, res, arm, parts):
    rec = measure.measure_run(wd, parts, log=lambda *_: None, **settings)
    return {"arm": arm, "seed": int(cfg.seed), "config": json.loads(cfg.to_json_best_effort()),
            "results": res, **rec}


control = config.copy_and_resolve_references()
control.method.dis_temp = 0.0
control_res = train.run(control, workdir + "_dis_temp=0", progress=False)
recs = [measured_record(config, workdir, results, "base", ("pairs", "lazy")),
        measured_record(control, workdir + "_dis_temp=0", control_res, "dis_temp=0", ("pairs",))]
out = judge.orthogonality(judge.Sweep(recs))
print("prediction:", out["prediction"], "\\ncriterion:", out["criterion"])
__import__("pandas").DataFrame(out["findings"])[["quantity", "prediction", "text", "verdict"]]"""


LAZY = """# (d) Lazy regime over whole tasks (the base run's record above): kernel distance S and e_lin
# between theta_t^0 and theta_t, and a linearised run against the network.
from IPython.display import Image, display
d = judge.laziness(judge.Sweep(recs[:1]), plot_path=workdir + "_theory_d.png")
print("prediction:", d["prediction"], "\\ncriterion:", d["criterion"])
display(__import__("pandas").DataFrame(d["findings"])[["quantity", "text", "verdict"]])
display(Image(workdir + "_theory_d.png"))"""

SWEEPS = """# (a)-(f) as a sweep of training runs over seeds: one command that resumes where it stopped (records
# in runs/theory), tiny or real scale by the config (this cell only prints it; --plan lists the
# runs); python -m scripts.ntk_page then writes docs/ntk.md from the records. Both run from a
# checkout's root (scripts/ is not installed with the package).
print("python -m scripts.theory --config=configs/tiny.py:data=digits --root=workdirs/theory_tiny --seeds=0,1")
print("python -m scripts.theory --config=configs/theory_dinov2s.py:size=56,per_class=200,test_per_class=200,epochs=2 "
      "--config.data.subsample_per_seed=True --root=runs/theory")"""

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
      "(a)-(f) over seeds are `python -m scripts.theory`.",
      INSTALL, SETUP, TRAIN, NTK, CHECKS, COMPARE, LAZY, SWEEPS])
  print("wrote notebooks")
