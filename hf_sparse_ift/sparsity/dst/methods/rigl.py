"""RigL (Evci et al. 2020): drop the smallest |w|, regrow where the dense gradient |∇w| is largest (on blocks: the
blocks of smallest norm, regrown where the dense gradient's block norm is largest)."""

import torch

from .base import DropGrowMethod, LayerUpdate


class RigL(DropGrowMethod):
    name = "rigl"
    needs_dense_grad = True

    def grow_scores(self, update: LayerUpdate) -> torch.Tensor:
        return update.dense_grad().abs().float()
