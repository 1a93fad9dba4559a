"""Files shipped with the package: YAML presets (`configs/`), the model card template, the built-in corpus,
tokenizer and tasks, and the YAML reading every config goes through."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import UsageError

if TYPE_CHECKING:
    from .models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig


def _shipped(folder: str) -> Path:
    """A data folder at the repository root (``configs``, ``model_cards``): a source checkout's (one whose root holds
    this project's pyproject.toml), else the installed copy. Never a folder that merely sits beside the package: in an
    installed wheel that is site-packages, where another distribution's ``configs`` may be."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "hf-sparse-ift"' in pyproject.read_text() and (root / folder).is_dir():
        return root / folder
    return Path(str(resources.files(f"hf_sparse_ift.{folder}")))


def configs_dir() -> Path:
    """YAML presets: ``pretrain-*.yaml``, ``models/``, ``accelerate/``."""
    return _shipped("configs")


def model_card_template() -> Path:
    return _shipped("model_cards") / "sparse_wide_gpt.md"


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
    raise UsageError(f"no config file or preset named {str(name_or_path)!r}; presets in configs/{folder}: {names}")


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; every float a person writes is a float here."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str = "the text"):
    """A YAML document or scalar (``1e-4`` -> 0.0001, ``[a, b]`` -> list, ``null`` -> None). Malformed YAML raises
    ValueError naming `where` and the place and kind of the error."""
    try:
        return yaml.load(text, Loader=_YAMLLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise UsageError(f"{where} is not valid YAML{at}: {problem}" + (f" ({context})" if context else "")) from None


def load_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason} at byte {err.start})"
        raise UsageError(f"{path}: cannot read it as a YAML config: {why or err}") from None
    data = parse_yaml(text, where=str(path)) or {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def model_config(name_or_path: str | Path, **overrides) -> SparseWideGPTConfig:
    """`SparseWideGPTConfig` from a model preset (``configs/models/<name>.yaml``) or a YAML path."""
    from .models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig

    values = load_yaml(resolve_config_path(name_or_path, "models"))
    values.update(overrides)
    return SparseWideGPTConfig(**values)
