"""RigL (Evci et al. 2020): drop the smallest |w|, regrow where the dense gradient |∇w| is largest."""

import torch

from .base import LayerUpdate, UnstructuredMethod


class RigL(UnstructuredMethod):
    name = "rigl"
    needs_dense_grad = True

    def grow_scores(self, update: LayerUpdate) -> torch.Tensor:
        return update.dense_grad().abs().float()
