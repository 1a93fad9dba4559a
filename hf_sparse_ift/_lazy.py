"""Lazy package attributes (PEP 562): a package names what it exports and where each name lives, and the module
holding it is imported on first use. This keeps ``import hf_sparse_ift`` and the ``hf-sparse-ift`` command's help and
argument errors free of torch and transformers (importing torch alone takes over a second)."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for `package`, whose names ``exports`` maps to the (relative) module defining each."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # Looked up on every access, not cached in the package: a name patched in its module (a test's monkeypatch)
        # is what every caller then sees.
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
