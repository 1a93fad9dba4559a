"""The dependency releases this package supports, checked at import, and the shims for what differs between builds.

`MINIMUM_VERSIONS` are the oldest releases the test suite passes on (docs/compatibility.md has the measured table
and the commands). pyproject.toml repeats them as its lower bounds and tests/models/test_versions.py checks that the two
agree. This folder is also the model's remote code (copied next to every checkpoint), so the model's own floors are
checked where this package is not installed too: importing `configuration_sparse_wide_gpt` runs that check.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

MINIMUM_VERSIONS = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "safetensors": "0.8.0",
    "accelerate": "1.15.0",
    "datasets": "3.0.0",
    "lm-eval": "0.4.12",
}
# What the model code itself (this folder, also run as remote code) imports.
MODEL_REQUIREMENTS = ("torch", "transformers", "safetensors")


def check_versions(names=MODEL_REQUIREMENTS, minimum: dict[str, str] = MINIMUM_VERSIONS) -> None:
    """Raise one ImportError naming every package in `names` that is older than its floor, and what is installed."""
    unmet = []
    for name in names:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append((name, "not installed", minimum[name]))
            continue
        if Version(installed) < Version(minimum[name]):
            unmet.append((name, installed, minimum[name]))
    if unmet:
        needed = " ".join(f"'{name}>={floor}'" for name, _, floor in unmet)
        found = ", ".join(f"{name} {installed}" for name, installed, _ in unmet)
        raise ImportError(
            f"Sparse Wide GPT (hf-sparse-ift) needs {needed} but found {found}: run pip install --upgrade {needed}"
        )


def __getattr__(name: str):
    """``DTensor`` and ``distribute_tensor``, or None for both where torch was built without distributed support (some
    macOS and mobile builds). Looked up on first use, so that the version check above runs without importing torch."""
    if name not in ("DTensor", "distribute_tensor"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        DTensor = distribute_tensor = None
    globals().update(DTensor=DTensor, distribute_tensor=distribute_tensor)
    return globals()[name]
