"""Static sparsity: the initial random masks are kept for the whole run (the paper's baseline)."""

from .base import DSTMethod


class Static(DSTMethod):
    name = "static"
    updates_masks = False
    supports_blocks = True
