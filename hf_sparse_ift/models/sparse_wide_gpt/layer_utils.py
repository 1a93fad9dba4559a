"""Small helpers shared by the model, its checkpoint layouts and condensing: what a sparse layer is, how a layer is
swapped for another, and how a sharded tensor is gathered."""

from __future__ import annotations

import torch
from torch import nn

from .compat import DTensor


def is_sparse_layer(module: nn.Module) -> bool:
    """Whether `module` is a sparse layer, masked (`SparseLinear`) or block-sparse (`BlockSparseLinear`).

    The layer classes say so with a ``sparse_layout`` class attribute, read from the class (never the instance: a
    block layer's ``weight_mask`` is computed on access). Duck-typed rather than ``isinstance`` so that the classes of
    a model loaded as remote code, which live in another module, count too."""
    return getattr(type(module), "sparse_layout", None) in ("masked", "block")


def is_masked_layer(module: nn.Module) -> bool:
    """Whether `module` is a masked sparse layer: a full ``weight`` with a bool ``weight_mask`` buffer beside it."""
    return getattr(type(module), "sparse_layout", None) == "masked"


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
