"""The BSR layout of a block-sparse weight, and the reference product every kernel is checked against.

Layout (the one `torch.sparse_bsr_tensor` uses): a weight of shape (out_features, in_features) cut into blocks of
(block_rows, block_cols); ``blocks`` holds the active ones, shape (n_active, block_rows, block_cols), ordered by
block-row and within a row by block-column; ``crow_indices`` (out_features // block_rows + 1, int64) says where each
block-row's blocks start in ``blocks``; ``col_indices`` (n_active, int64) is each block's block-column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def block_rows_of(crow_indices: torch.Tensor) -> torch.Tensor:
    """The block-row of every active block (n_active,), from the compressed row pointers."""
    counts = crow_indices[1:] - crow_indices[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow_indices.device), counts)


def dense_from_blocks(
    blocks: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """The dense (out_features, in_features) weight: active blocks in place, zeros elsewhere. Differentiable."""
    n_rows = crow_indices.numel() - 1
    block_rows, block_cols = blocks.shape[1:]
    grid = blocks.new_zeros(n_rows, in_features // block_cols, block_rows, block_cols)
    grid = grid.index_put((block_rows_of(crow_indices), col_indices), blocks)
    return grid.permute(0, 2, 1, 3).reshape(n_rows * block_rows, in_features)


def block_sparse_linear_reference(
    x: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference implementation: materialise the dense weight and call `F.linear` (correct, not fast)."""
    return F.linear(x, dense_from_blocks(blocks, crow_indices, col_indices, in_features), bias)


# What ``kernel=`` (and a config's ``block_kernel``) may name: "auto" picks by device (`block_sparse.resolve_kernel`),
# "reference" is `block_sparse_linear_reference`, the others are `BlockSparseKernel` names.
KERNEL_CHOICES = ("auto", "cpu", "triton", "torch-bsr", "reference")


class BlockSparseKernel(NamedTuple):
    """One way to compute `block_sparse_linear`: three functions on 2-d operands (tokens, features), each returning
    its result in the input's dtype. ``name`` is what run records and ``kernel=`` call it."""

    name: str
    forward: Callable  # (x2, blocks, bias, crow_indices, col_indices) -> y2
    grad_input: Callable  # (gy, blocks, crow_indices, col_indices, in_features) -> dx2
    grad_blocks: Callable  # (gy, x2, blocks, crow_indices, col_indices) -> d_blocks, shaped like blocks
    # both gradients at once, (gy, x2, blocks, crow_indices, col_indices, in_features) -> (dx2, d_blocks), where a
    # kernel computes them faster together than apart; None: the two functions above
    backward: Callable | None = None
