"""The CUDA kernel of `block_sparse_linear`: torch's BSR kernels (Triton ``bsr_dense_mm`` behind ``bsr @ dense``) for
the forward and ``dX``, one batched GEMM per group of blocks for ``dW``. The same code runs on CPU tensors (torch's
CPU BSR kernels), which is how the tests check it without a GPU. Not measured on a GPU yet.

Same interface as `block_sparse_cpu`: 2-d operands (tokens, features), results in the input's dtype.
"""

from __future__ import annotations

import torch

from .block_sparse_layout import BlockSparseKernel, block_rows_of


def takes(block_shape: torch.Size, dtype: torch.dtype, tokens: int) -> bool:
    """Whether torch's Triton BSR kernels accept these operands (their own checks, `torch.sparse._triton_ops`):
    square blocks of a power of two >= 16, half/bf16/fp32, a dense operand whose columns are a multiple of 16."""
    size = block_shape[0]
    return (
        block_shape[0] == block_shape[1]
        and size >= 16
        and size & (size - 1) == 0
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
        and tokens % 16 == 0
    )


def forward(x2: torch.Tensor, blocks: torch.Tensor, bias, crow_indices, col_indices) -> torch.Tensor:
    n_rows = crow_indices.numel() - 1
    out_features, in_features = n_rows * blocks.shape[1], x2.shape[1]
    weight = torch.sparse_bsr_tensor(crow_indices, col_indices, blocks, size=(out_features, in_features))
    y = (weight @ x2.t().contiguous()).t()  # BSR @ dense gives (out_features, tokens)
    if bias is not None:
        y = y + bias
    return y.contiguous()


def grad_input(gy: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, in_features: int) -> torch.Tensor:
    # W^T in BSR: the blocks transposed, ordered by block-column
    n_rows = crow_indices.numel() - 1
    block_rows, block_cols = blocks.shape[1:]
    order = torch.argsort(col_indices, stable=True)
    counts = torch.bincount(col_indices, minlength=in_features // block_cols)
    crow_t = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    weight_t = torch.sparse_bsr_tensor(
        crow_t,
        block_rows_of(crow_indices)[order],
        blocks[order].transpose(1, 2).contiguous(),
        size=(in_features, n_rows * block_rows),
    )
    return (weight_t @ gy.t().contiguous()).t().contiguous()


def grad_blocks(gy: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices) -> torch.Tensor:
    n_rows = crow_indices.numel() - 1
    n_active, block_rows, block_cols = blocks.shape
    in_features = x2.shape[1]
    x_blocks = x2.view(-1, in_features // block_cols, block_cols)
    gy_blocks = gy.view(-1, n_rows, block_rows)
    rows = block_rows_of(crow_indices)
    grad = torch.empty_like(blocks)
    # groups of blocks so the gathered inputs stay within about 256 MiB
    group = max(1, (1 << 26) // max(1, gy.shape[0] * (block_rows + block_cols)))
    for start in range(0, n_active, group):
        end = min(n_active, start + group)
        a = gy_blocks[:, rows[start:end]].permute(1, 2, 0)  # (blocks, block_rows, tokens)
        b = x_blocks[:, col_indices[start:end]].transpose(0, 1)  # (blocks, tokens, block_cols)
        torch.bmm(a, b, out=grad[start:end])
    return grad


KERNEL = BlockSparseKernel("torch-bsr", forward, grad_input, grad_blocks)
