"""What dynamic sparse training reads off a `BlockSparseLinear`'s block grid: block norms to rank blocks by, and
where each block of a new block mask sits in ``weight_blocks`` now (to move values and optimizer state)."""

from __future__ import annotations

import torch

from ...models.sparse_wide_gpt.block_sparse_layout import block_rows_of
from ...models.sparse_wide_gpt.sparse_layers import BlockSparseLinear


def block_slots(layer: BlockSparseLinear, block_mask: torch.Tensor) -> torch.Tensor:
    """For every active block of `block_mask` (BSR order), its slot in ``weight_blocks`` now; -1 where the block is
    not active now."""
    slot = torch.full(layer.block_grid, -1, dtype=torch.int64, device=layer.block_crow_indices.device)
    slot[block_rows_of(layer.block_crow_indices), layer.block_col_indices] = torch.arange(
        layer.n_active, device=slot.device
    )
    return slot[block_mask.to(slot.device)]


def block_norms(layer: BlockSparseLinear, matrix: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of every block of a dense (out_features, in_features) `matrix` (e.g. a weight gradient), as
    a (block-rows, block-columns) float32 grid."""
    rows, cols = layer.sparsity_block
    grid_rows, grid_cols = layer.block_grid
    return torch.linalg.vector_norm(matrix.float().reshape(grid_rows, rows, grid_cols, cols), dim=(1, 3))


def active_block_norms(layer: BlockSparseLinear, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The Frobenius norm of every active block of `blocks` (default ``weight_blocks``) in its place on the
    (block-rows, block-columns) grid; 0 at inactive blocks."""
    blocks = layer.weight_blocks if blocks is None else blocks
    grid = torch.zeros(layer.block_grid, dtype=torch.float32, device=blocks.device)
    norms = torch.linalg.vector_norm(blocks.float(), dim=(1, 2))
    grid[block_rows_of(layer.block_crow_indices), layer.block_col_indices] = norms
    return grid
