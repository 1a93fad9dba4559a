"""Masks of sparse layers (`SparseLinear`, `BlockSparseLinear`): finding them, counting them, checking their
invariant, selecting positions deterministically and storing masks compactly."""

from __future__ import annotations

import torch
from torch import nn

from ..models.sparse_wide_gpt.layer_utils import is_sparse_layer
from ..models.sparse_wide_gpt.sparse_layers import BlockSparseLinear, SparseLinear, derive_seed
from ..models.sparse_wide_gpt.sparse_safetensors import pack_bits

__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "count_differing_bits",
    "derive_seed",
    "pack_bits",
    "parameter_counts",
    "select_top_k",
    "select_top_k_per_row",
    "sparse_layers",
]


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear | BlockSparseLinear]:
    """Name -> sparse layer (masked or block-sparse; `is_sparse_layer`) of `model` (unwrapping DDP's ``.module``),
    in model order."""
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if is_sparse_layer(m)}


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


def select_top_k_per_row(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Boolean mask of the k largest (or smallest) entries of every row of a 2-D tensor; ties go to the lowest
    index (a stable sort keeps equal scores in index order)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return chosen
    columns = scores.sort(dim=1, descending=largest, stable=True).indices[:, :k]
    return chosen.scatter_(1, columns, True)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def count_differing_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of differing positions of two `pack_bits` outputs (a device scalar: no host sync)."""
    return _POPCOUNT.to(a.device)[(a ^ b).long()].sum(dtype=torch.int64)
