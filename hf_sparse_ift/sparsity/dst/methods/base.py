"""What a DST method is: given one layer at an update step, the new mask. The engine does the rest
(schedule, applying masks to weights and optimizer state, invariants, checkpointing, telemetry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...masks import SparseLinear, derive_seed, select_top_k

METHODS: dict[str, type[DSTMethod]] = {}


@dataclass
class LayerUpdate:
    """One layer at one update step, as a method sees it."""

    name: str
    index: int  # position of the layer in model order
    layer: SparseLinear
    weight: torch.Tensor  # the whole weight (gathered under FSDP2), detached
    budget: int  # active weights the layer must keep
    step: int
    seed: int
    dense_grad: Callable[[], torch.Tensor]  # the unmasked gradient of this step (methods with needs_dense_grad)

    def generator(self) -> torch.Generator:
        """Randomness that is a pure function of (seed, step, layer): every rank draws the same."""
        device = self.layer.weight_mask.device
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, self.step, self.index))


class DSTMethod:
    """Base class; subclasses set ``name`` and implement `new_mask` (and optionally `initial_mask`)."""

    name: ClassVar[str]
    updates_masks: ClassVar[bool] = True  # False: the masks never change (static sparsity)
    needs_dense_grad: ClassVar[bool] = False  # True: the engine captures the unmasked gradient on update steps

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            METHODS[cls.name] = cls

    def __init__(self, config):
        self.config = config

    def initial_mask(self, layer: SparseLinear, index: int) -> torch.Tensor | None:
        """A mask to start from instead of the model's (None: keep the model's)."""
        return None

    def new_mask(self, update: LayerUpdate, drop_fraction: float) -> tuple[torch.Tensor, dict]:
        """The layer's next mask and its telemetry (``dropped``, ``grown``; ``active`` when the count changes)."""
        raise NotImplementedError


class UnstructuredMethod(DSTMethod):
    """Drop the k active weights of smallest |w|, grow the k inactive positions of largest `grow_scores`,
    k = round(α · active): the active count stays exactly the budget."""

    def grow_scores(self, update: LayerUpdate) -> torch.Tensor:
        """One score per weight (flat); only positions inactive before the update are eligible."""
        raise NotImplementedError

    def new_mask(self, update: LayerUpdate, drop_fraction: float) -> tuple[torch.Tensor, dict]:
        mask = update.layer.weight_mask.reshape(-1)
        n_active = update.budget  # constant: no need to count (and sync) on the device
        k = min(round(drop_fraction * n_active), n_active, mask.numel() - n_active)
        inf = torch.tensor(float("inf"), device=mask.device)
        magnitude = update.weight.reshape(-1).abs().float()
        dropped = select_top_k(torch.where(mask, magnitude, inf), k, largest=False)
        grown = select_top_k(torch.where(mask, -inf, self.grow_scores(update).reshape(-1)), k, largest=True)
        new = (mask & ~dropped) | grown
        return new.view_as(update.layer.weight_mask), {"dropped": k, "grown": k}
