#!/usr/bin/env bash
# Set-up on a fresh machine, idempotent: a virtual environment in .venv holding PyTorch and this package
# with its test tools. Without a GPU it installs torch 2.13.0, whose CPU build this project's machines
# keep on disk; with one (nvidia-smi present) it installs the default CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch
  else
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
fi
# Without a GPU also the "triton" extra: the triton that the CUDA build of this torch pins (pyproject.toml), for the
# block-sparse kernels' interpreter and compile-only tests; a CUDA build of torch brings its own.
extras=dev
command -v nvidia-smi >/dev/null 2>&1 || extras=dev,triton
# PYTHONWARNINGS: setuptools warns about every editable install of a package with a mapped data folder.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[$extras]"
