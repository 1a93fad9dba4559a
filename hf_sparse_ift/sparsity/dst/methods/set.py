"""SET (Mocanu et al. 2018): drop the smallest |w|, regrow as many at uniformly random inactive positions (on
blocks: the blocks of smallest norm, regrown at random inactive blocks)."""

import torch

from .base import DropGrowMethod, LayerUpdate


class SET(DropGrowMethod):
    name = "set"

    def grow_scores(self, update: LayerUpdate) -> torch.Tensor:
        return torch.rand(update.mask.numel(), generator=update.generator(), device=update.mask.device)
