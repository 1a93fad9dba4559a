"""Small helpers shared by the model, its checkpoint layouts and condensing: what a sparse layer is, how a layer is
swapped for another, and how a sharded tensor is gathered."""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_sparse_layer(module: nn.Module) -> bool:
    """Whether `module` is a sparse layer: it carries a bool ``weight_mask`` (its active positions).

    The one test used everywhere (masked `SparseLinear`, block-sparse layers and any ``nn.Linear`` given a mask), so a
    new kind of sparse layer is counted, saved, condensed and trained the same way by exposing its mask."""
    mask = getattr(module, "weight_mask", None)
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule called `name` (dotted path) is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks when it is a DTensor shard (tensor parallelism, FSDP2), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor
