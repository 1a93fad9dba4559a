"""Masks of sparse layers (`SparseLinear`, `BlockSparseLinear`): finding them, counting them, checking their
invariant, selecting positions deterministically and storing masks compactly."""

from __future__ import annotations

import torch
from torch import nn

from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import BlockSparseLinear, SparseLinear, derive_seed

__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "count_differing_bits",
    "derive_seed",
    "masked_nonzeros",
    "pack_bits",
    "parameter_counts",
    "select_top_k",
    "sparse_layers",
]


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear | BlockSparseLinear]:
    """Name -> sparse layer (masked or block-sparse) of `model` (unwrapping DDP's ``.module``), in model order."""
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, (SparseLinear, BlockSparseLinear))}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, active parameters (inactive sparse weights excluded), sparse weights and inactive ones.

    Totals count every weight of a sparse layer, active or not, whichever layout stores it: a block-sparse layer
    holds only its active blocks, and its inactive ones are added back so both layouts report the same numbers."""
    layers = sparse_layers(model).values()
    stored = sum(p.numel() for p in model.parameters())
    sparse = sum(m.in_features * m.out_features for m in layers)
    inactive = sum(int((~m.weight_mask).sum()) for m in layers)
    total = stored + sum(int((~m.weight_mask).sum()) for m in layers if isinstance(m, BlockSparseLinear))
    return {"total": total, "active": total - inactive, "sparse_weights": sparse, "inactive": inactive}


@torch.no_grad()
def masked_nonzeros(model: nn.Module) -> dict[str, int]:
    """Per masked layer, how many weights are non-zero where the mask says inactive (the invariant wants 0
    everywhere; block-sparse layers store no inactive weights)."""
    return {
        name: int((m.weight.ne(0) & ~m.weight_mask).sum())
        for name, m in sparse_layers(model).items()
        if isinstance(m, SparseLinear)
    }


def select_top_k(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Boolean mask of the k largest (or smallest) entries of a 1-D tensor; ties go to the lowest index.

    `torch.topk` finds the k-th value (multi-block radix select on GPUs, unlike kthvalue or a sort of one
    long slice); everything strictly beyond it is taken, then the first ties by index until k are chosen.
    Exact and deterministic, with no host synchronisation.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    values = scores.topk(k, largest=largest, sorted=False).values
    threshold = values.min() if largest else values.max()
    beyond = scores > threshold if largest else scores < threshold
    ties = scores == threshold
    room = k - beyond.sum()
    return beyond | (ties & (ties.cumsum(0, dtype=torch.int32) <= room))


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 positions per byte in row-major order, least significant bit first."""
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    return (flat * _BIT_WEIGHTS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`."""
    numel = 1
    for size in shape:
        numel *= size
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:numel].reshape(shape)


def count_differing_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of differing positions of two `pack_bits` outputs (a device scalar: no host sync)."""
    return _POPCOUNT.to(a.device)[(a ^ b).long()].sum(dtype=torch.int64)
