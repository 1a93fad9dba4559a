"""What a DST method is: given one layer at an update step, the new mask. The engine does the rest
(schedule, applying masks to weights and optimizer state, invariants, checkpointing, telemetry).

A method sees a layer's mask as a grid of *units*: single weights for a masked `SparseLinear`, whole blocks for a
`BlockSparseLinear` (its ``block_mask``). Magnitudes and dense gradients come per unit (for a block: the Frobenius
norm of its values), so a method written for units works on both (``supports_blocks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...masks import derive_seed, select_top_k, select_top_k_per_row


@dataclass
class LayerUpdate:
    """One layer at one update step, as a method sees it."""

    name: str
    index: int  # position of the layer in model order
    layer: nn.Module  # a SparseLinear or a BlockSparseLinear
    weight: torch.Tensor  # the whole weight (or the whole active blocks), gathered under FSDP2, detached
    mask: torch.Tensor  # the units: the weight mask, or the block mask (block-rows x block-columns)
    magnitude: torch.Tensor  # per unit: |w|, or each active block's norm (0 at inactive blocks)
    budget: int  # active units the layer must keep
    constant_fan_in: bool  # every row of `mask` keeps its count of active units
    step: int
    seed: int
    # Per unit, the unmasked gradient of this step (of a block: its norm), for methods with needs_dense_grad.
    dense_grad: Callable[[], torch.Tensor]

    def generator(self) -> torch.Generator:
        """Randomness that is a pure function of (seed, step, layer): every rank draws the same."""
        return torch.Generator(device=self.mask.device).manual_seed(derive_seed(self.seed, self.step, self.index))


class DSTMethod:
    """Base class; subclasses set ``name`` and implement `new_mask` (and optionally `initial_mask`). A method is
    usable once it is listed in `methods.METHODS`."""

    name: ClassVar[str]
    updates_masks: ClassVar[bool] = True  # False: the masks never change (static sparsity)
    needs_dense_grad: ClassVar[bool] = False  # True: the engine captures the unmasked gradient on update steps
    supports_blocks: ClassVar[bool] = False  # True: works on block-sparse layers (units are blocks)

    def __init__(self, config):
        self.config = config

    def initial_mask(self, layer: nn.Module, index: int) -> torch.Tensor | None:
        """A mask to start from instead of the model's (None: keep the model's)."""
        return None

    def new_mask(self, update: LayerUpdate, drop_fraction: float) -> tuple[torch.Tensor, dict]:
        """The layer's next unit mask and its telemetry (``dropped``, ``grown``; ``active`` when the count changes)."""
        raise NotImplementedError


class DropGrowMethod(DSTMethod):
    """Drop the k active units of smallest magnitude, grow the k inactive units of largest `grow_scores`,
    k = round(α · active): the active count stays exactly the budget. With a constant fan-in, every row of units
    drops and grows k = round(α · its active units) and so keeps its count."""

    supports_blocks = True

    def grow_scores(self, update: LayerUpdate) -> torch.Tensor:
        """One score per unit (shaped like `update.mask` or flat); only units inactive before are eligible."""
        raise NotImplementedError

    def new_mask(self, update: LayerUpdate, drop_fraction: float) -> tuple[torch.Tensor, dict]:
        mask = update.mask
        inf = torch.tensor(float("inf"), device=mask.device)
        drop_scores = torch.where(mask, update.magnitude.float(), inf)
        grow_scores = torch.where(mask, -inf, self.grow_scores(update).reshape(mask.shape))
        if update.constant_fan_in:
            rows, columns = mask.shape
            per_row = update.budget // rows  # constant: no need to count (and sync) on the device
            k = min(round(drop_fraction * per_row), per_row, columns - per_row)
            dropped = select_top_k_per_row(drop_scores, k, largest=False)
            grown = select_top_k_per_row(grow_scores, k, largest=True)
            changed = k * rows
        else:
            n_active = update.budget
            k = min(round(drop_fraction * n_active), n_active, mask.numel() - n_active)
            dropped = select_top_k(drop_scores.reshape(-1), k, largest=False).view_as(mask)
            grown = select_top_k(grow_scores.reshape(-1), k, largest=True).view_as(mask)
            changed = k
        new = (mask & ~dropped) | grown
        return new, {"dropped": changed, "grown": changed}
