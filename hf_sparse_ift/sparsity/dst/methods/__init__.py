"""DST methods, one per file. A file defines a `DSTMethod` subclass with a ``name``; it is registered by
being here (every module of this folder is imported), so a new method is one new file."""

import importlib
import pkgutil

from .base import METHODS, DropGrowMethod, DSTMethod, LayerUpdate

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "DSTMethod", "DropGrowMethod", "LayerUpdate"]
