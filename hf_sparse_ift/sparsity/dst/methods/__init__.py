"""DST methods, one per file: a `DSTMethod` subclass with a ``name``. `METHODS` lists them by that name; a new method is
one new file and one line here."""

from .base import DropGrowMethod, DSTMethod, LayerUpdate
from .rigl import RigL
from .set import SET
from .srigl import SRigL
from .static import Static

METHODS: dict[str, type[DSTMethod]] = {method.name: method for method in (Static, SET, RigL, SRigL)}

__all__ = ["METHODS", "SET", "DSTMethod", "DropGrowMethod", "LayerUpdate", "RigL", "SRigL", "Static"]
