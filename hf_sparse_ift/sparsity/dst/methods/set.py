"""SET (Mocanu et al. 2018): drop the smallest |w|, regrow as many at uniformly random inactive positions."""

import torch

from .base import LayerUpdate, UnstructuredMethod


class SET(UnstructuredMethod):
    name = "set"

    def grow_scores(self, update: LayerUpdate) -> torch.Tensor:
        mask = update.layer.weight_mask
        return torch.rand(mask.numel(), generator=update.generator(), device=mask.device)
