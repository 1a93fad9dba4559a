"""YAML presets shipped in `configs/` (installed as `hf_sparse_ift.configs`) and the built-in data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from .configuration_sparse_wide_gpt import SparseWideGPTConfig


def configs_dir() -> Path:
    """The `configs/` folder: the repository's in a checkout, the installed copy otherwise."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("hf_sparse_ift.configs")))


def builtin_dir() -> Path:
    """Corpus and tokenizer shipped with the package (see scripts/make_builtin_corpus.py)."""
    return Path(__file__).resolve().parent / "builtin"


def resolve_config_path(name_or_path: str | Path, folder: str = "") -> Path:
    """A YAML file given as a path, or as a preset name such as ``gpt3-small-sw75``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = configs_dir() / folder / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(p.stem for p in (configs_dir() / folder).glob("*.yaml"))
    raise ValueError(f"no config file or preset named {str(name_or_path)!r}; presets in configs/{folder}: {names}")


def load_yaml(path: str | Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def model_config(name_or_path: str | Path, **overrides) -> SparseWideGPTConfig:
    """`SparseWideGPTConfig` from a model preset (``configs/models/<name>.yaml``) or a YAML path."""
    values = load_yaml(resolve_config_path(name_or_path, "models"))
    values.update(overrides)
    return SparseWideGPTConfig(**values)
