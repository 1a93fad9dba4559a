#!/usr/bin/env bash
# The oldest supported releases, for CI: a second virtual environment, .venv-floor, holding this package with each
# dependency in MINIMUM_VERSIONS (hf_sparse_ift/models/sparse_wide_gpt/compat.py, the one list of floors) pinned to
# its floor. Idempotent, like scripts/setup.sh; .venv keeps the newest releases.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv-floor/bin/python ] || "$python" -m venv .venv-floor
.venv-floor/bin/python -m pip install -q --upgrade pip
# The floors as pip constraints (name==version), read from compat.py without importing it (no torch needed yet).
.venv-floor/bin/python - > .venv-floor/floors.txt <<'PY'
import ast
import pathlib

source = pathlib.Path("hf_sparse_ift/models/sparse_wide_gpt/compat.py").read_text()
for node in ast.parse(source).body:
    if isinstance(node, ast.Assign) and node.targets[0].id == "MINIMUM_VERSIONS":
        for name, version in ast.literal_eval(node.value).items():
            print(f"{name}=={version}")
PY
# PYTHONWARNINGS: setuptools warns about every editable install of a package with a mapped data folder.
PYTHONWARNINGS=ignore .venv-floor/bin/python -m pip install -q -c .venv-floor/floors.txt -e ".[dev]"
