"""`block_sparse_linear`: ``F.linear`` for a weight stored as its active blocks (BSR layout, `block_sparse_layout`).

`block_sparse_linear(x, blocks, crow_indices, col_indices, in_features, bias)` is ``F.linear(x, W, bias)`` for the
dense ``W`` those blocks describe, with gradients for ``x``, ``blocks`` (active blocks only) and ``bias``. One
autograd Function, `_BlockSparseLinear`, computes it with a `BlockSparseKernel`, all with the same results:

* CPU tensors: `block_sparse_cpu` (one BLAS call per active block, block-rows shared out to worker threads);
* CUDA tensors: `block_sparse_bsr` (torch's BSR kernels), where they accept the operands;
* anything else (meta tensors, DTensors, other devices): `block_sparse_linear_reference`, which materialises the
  dense weight.

A kernel is three functions on 2-d operands, each returning its result in the input's dtype (`BlockSparseKernel`);
each kernel module ends with its ``KERNEL``.

Under autocast the inputs are cast to the autocast dtype first, as `F.linear` does, so gradients reach fp32
master blocks through the cast.
"""

from __future__ import annotations

import torch

from .block_sparse_bsr import KERNEL as TORCH_BSR_KERNEL
from .block_sparse_bsr import takes as _bsr_takes
from .block_sparse_cpu import KERNEL as CPU_KERNEL
from .block_sparse_layout import BlockSparseKernel, block_rows_of, block_sparse_linear_reference, dense_from_blocks

__all__ = [
    "BlockSparseKernel",
    "block_rows_of",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "dense_from_blocks",
]


def block_sparse_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the block-sparse ``W``; computes only with the active blocks."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # what F.linear does under autocast: every floating input in the autocast dtype (a differentiable cast)
        dtype = torch.get_autocast_dtype(device_type)
        x, blocks = x.to(dtype), blocks.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    kernel = _kernel_for(x, blocks, crow_indices, col_indices, bias)
    if kernel is None:
        return block_sparse_linear_reference(x, blocks, crow_indices, col_indices, in_features, bias)
    if x.dtype != blocks.dtype or (bias is not None and bias.dtype != x.dtype):
        raise RuntimeError(
            "block_sparse_linear: x, blocks and bias must have one dtype (outside autocast, as for F.linear); got "
            f"x {x.dtype}, blocks {blocks.dtype}, bias {None if bias is None else bias.dtype}"
        )
    if x.shape[-1] != in_features:
        raise RuntimeError(
            f"block_sparse_linear: x has {x.shape[-1]} features in its last dim, the weight {in_features}"
        )
    with torch.autocast(device_type, enabled=False):
        return _BlockSparseLinear.apply(x, blocks, bias, crow_indices, col_indices, in_features, kernel)


def _kernel_for(x, blocks, crow_indices, col_indices, bias):
    """The kernel that computes on these inputs, or None for the reference."""
    tensors = (x, blocks, crow_indices, col_indices) + (() if bias is None else (bias,))
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # DTensor, fake or other subclasses
        return None
    if x.device.type == "cpu":
        return CPU_KERNEL
    if x.device.type == "cuda" and _bsr_takes(blocks.shape[1:], x.dtype, x.numel() // max(1, x.shape[-1])):
        return TORCH_BSR_KERNEL
    return None


class _BlockSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, bias, crow_indices, col_indices, in_features, kernel):
        x2 = x.reshape(-1, in_features)
        y = kernel.forward(x2, blocks, bias, crow_indices, col_indices)
        ctx.save_for_backward(x, blocks, crow_indices, col_indices)
        ctx.in_features, ctx.kernel = in_features, kernel
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, blocks, crow_indices, col_indices = ctx.saved_tensors
        need_x, need_blocks, need_bias = ctx.needs_input_grad[:3]
        kernel, in_features = ctx.kernel, ctx.in_features
        gy = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_blocks = grad_bias = None
        if need_x:
            grad_x = kernel.grad_input(gy, blocks, crow_indices, col_indices, in_features).view(x.shape)
        if need_blocks:
            grad_blocks = kernel.grad_blocks(gy, x.reshape(-1, in_features), blocks, crow_indices, col_indices)
        if need_bias:
            # the sum in fp32 for half inputs, as the CPU kernel always did
            grad_bias = gy.sum(0, dtype=torch.float32 if gy.dtype in (torch.float16, torch.bfloat16) else None)
            grad_bias = grad_bias.to(grad_output.dtype)
        return grad_x, grad_blocks, grad_bias, None, None, None, None
