"""`block_sparse_linear`: ``F.linear`` for a weight stored as its active blocks (BSR layout, `block_sparse_layout`).

`block_sparse_linear(x, blocks, crow_indices, col_indices, in_features, bias, kernel="auto")` is
``F.linear(x, W, bias)`` for the dense ``W`` those blocks describe, with gradients for ``x``, ``blocks`` (active
blocks only) and ``bias``. It is one operator registered with ``torch.library`` (its fake implementation and autograd
too), so ``torch.compile(fullgraph=True)`` traces through it; the operator computes with a `BlockSparseKernel`, every
kernel with the same results:

* ``"cpu"``: `block_sparse_cpu` (one BLAS call per active block, block-rows shared out to worker threads);
* ``"triton"``: `block_sparse_triton` (three Triton kernels over the active blocks; CUDA tensors, or CPU tensors
  in Triton's interpreter, ``TRITON_INTERPRET=1``);
* ``"torch-bsr"``: `block_sparse_bsr` (torch's BSR kernels for the forward and ``dX``, batched GEMMs for ``dW``);
* ``"reference"``: `block_sparse_linear_reference`, which materialises the dense weight (autograd through it).

``kernel="auto"`` picks by device (`resolve_kernel`): CPU tensors -> ``cpu``; CUDA tensors -> ``triton`` where triton
imports and the blocks are square of 16, 32, 64 or 128, else ``torch-bsr`` where torch's BSR kernels take the operands
(square power-of-two blocks >= 16, a token count that is a multiple of 16), else ``reference``; anything else (meta
tensors, DTensors, other devices) -> ``reference``. A named kernel that cannot compute on the operands is refused
with an error, never replaced.

A kernel is three functions on 2-d operands, each returning its result in the input's dtype (`BlockSparseKernel`),
and optionally a fourth computing both gradients in one pass (the CPU kernel's, bit for bit the other two's results);
each kernel module ends with its ``KERNEL``. The bias gradient is the same for all: a sum over tokens, in fp32 for
16-bit inputs.

Under autocast the inputs are cast to the autocast dtype first, as `F.linear` does, so gradients reach fp32
master blocks through the cast.
"""

from __future__ import annotations

import re

import torch

from .block_sparse_bsr import KERNEL as TORCH_BSR_KERNEL
from .block_sparse_bsr import takes as _bsr_takes
from .block_sparse_cpu import KERNEL as CPU_KERNEL
from .block_sparse_layout import (
    KERNEL_CHOICES,
    BlockSparseKernel,
    block_rows_of,
    block_sparse_linear_reference,
    dense_from_blocks,
)
from .block_sparse_triton import KERNEL as TRITON_KERNEL
from .block_sparse_triton import unavailable as _triton_unavailable
from .errors import UsageError

__all__ = [
    "KERNEL_CHOICES",
    "BlockSparseKernel",
    "block_rows_of",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "dense_from_blocks",
    "resolve_kernel",
]

KERNELS = {kernel.name: kernel for kernel in (CPU_KERNEL, TRITON_KERNEL, TORCH_BSR_KERNEL)}
assert set(KERNEL_CHOICES) == {"auto", *KERNELS, "reference"}, "every choice is a kernel, auto or reference"


def _cannot(kernel: str, device: torch.device, block_shape: tuple[int, int], dtype, tokens: int | None) -> str | None:
    """Why the named kernel cannot compute on operands like these, or None when it can."""
    if kernel == "cpu":
        return None if device.type == "cpu" else f"it computes on CPU tensors, these are on {device.type}"
    if kernel == "triton":
        return _triton_unavailable(block_shape, dtype, device)
    if kernel == "torch-bsr":
        rows, cols = block_shape
        if device.type == "cpu":
            return None if rows == cols else f"on CPU tensors it needs square blocks, these are {rows}x{cols}"
        if device.type != "cuda":
            return f"it computes on CPU or CUDA tensors, these are on {device.type}"
        if not _bsr_takes(torch.Size(block_shape), dtype, 16 if tokens is None else tokens):
            return (
                f"torch's Triton BSR kernels need square power-of-two blocks >= 16, float16/bfloat16/float32 and a "
                f"token count that is a multiple of 16; these are {rows}x{cols} blocks, {dtype}, {tokens} tokens"
            )
    return None


def resolve_kernel(
    kernel: str, device: torch.device | str, block_shape: tuple[int, int], dtype: torch.dtype, tokens: int | None = None
) -> str:
    """The kernel that `kernel` (one of `KERNEL_CHOICES`) computes with on operands on `device` with blocks of
    `block_shape` in `dtype` (and `tokens` rows of input, where known): ``auto`` picks by the rule in this module's
    docstring; a named kernel is returned as it is when it can compute there, else refused (UsageError)."""
    if kernel not in KERNEL_CHOICES:
        raise UsageError(f"kernel={kernel!r} is not a block-sparse kernel: expected one of {list(KERNEL_CHOICES)}")
    device = torch.device(device)
    block_shape = tuple(block_shape)
    if kernel == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            for candidate in ("triton", "torch-bsr"):
                if _cannot(candidate, device, block_shape, dtype, tokens) is None:
                    return candidate
        return "reference"
    reason = _cannot(kernel, device, block_shape, dtype, tokens)
    if reason is not None:
        raise UsageError(
            f"kernel={kernel!r} cannot compute this block-sparse linear: {reason}. Choose another of "
            f"{list(KERNEL_CHOICES)} ('auto' picks by device; a model's is its config's block_kernel)"
        )
    return kernel


def block_sparse_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the block-sparse ``W``; computes only with the active blocks, with `kernel`
    (one of `KERNEL_CHOICES`, see the module docstring)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # what F.linear does under autocast: every floating input in the autocast dtype (a differentiable cast)
        dtype = torch.get_autocast_dtype(device_type)
        x, blocks = x.to(dtype), blocks.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    tensors = (x, blocks, crow_indices, col_indices) + (() if bias is None else (bias,))
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # DTensor, fake or other subclasses
        if kernel not in ("auto", "reference"):
            resolve_kernel(kernel, "meta", blocks.shape[1:], x.dtype)  # a bad name gets its own message
            raise UsageError(
                f"kernel={kernel!r} computes on plain tensors, not {type(x).__name__}: use 'auto' or 'reference'"
            )
        kernel = "reference"
    else:
        tokens = x.numel() // max(1, x.shape[-1])
        kernel = resolve_kernel(kernel, x.device, blocks.shape[1:], x.dtype, tokens)
    if kernel == "reference":
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
    out_features = (crow_indices.shape[0] - 1) * blocks.shape[1]
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise RuntimeError(f"block_sparse_linear: bias of shape {tuple(bias.shape)} for {out_features} outputs")
    with torch.autocast(device_type, enabled=False):
        if not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, blocks, bias))
        ):
            # Nothing to differentiate and nothing tracing (plain tensors, checked above): the operator's function
            # itself, without the dispatcher: about 35 us less per call (215 -> 180 us for a 1536 x 1536 SW-75 layer
            # on one token, AMD EPYC, 2 threads), 2.5 ms of a 52 ms batch-1 decode token
            return _linear_forward(x, blocks, bias, crow_indices, col_indices, in_features, kernel)
        return _linear(x, blocks, bias, crow_indices, col_indices, in_features, kernel)


# The operators, one set per copy of this file: the package's own, and each checkpoint's remote code, which is this
# file imported under another module name (two copies cannot register one name).
_NAMESPACE = re.sub(r"\W", "_", __name__)


def _linear_forward(x, blocks, bias, crow_indices, col_indices, in_features: int, kernel: str) -> torch.Tensor:
    y = KERNELS[kernel].forward(x.reshape(-1, in_features), blocks, bias, crow_indices, col_indices)
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op(f"{_NAMESPACE}::linear", mutates_args=())
def _linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    kernel: str,
) -> torch.Tensor:
    return _linear_forward(x, blocks, bias, crow_indices, col_indices, in_features, kernel)


@_linear.register_fake
def _(x, blocks, bias, crow_indices, col_indices, in_features, kernel):
    return x.new_empty(*x.shape[:-1], (crow_indices.shape[0] - 1) * blocks.shape[1])


@torch.library.custom_op(f"{_NAMESPACE}::linear_grad_input", mutates_args=())
def _grad_input(
    grad_output: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    kernel: str,
) -> torch.Tensor:
    return KERNELS[kernel].grad_input(grad_output, blocks, crow_indices, col_indices, in_features)


@_grad_input.register_fake
def _(grad_output, blocks, crow_indices, col_indices, in_features, kernel):
    return grad_output.new_empty(grad_output.shape[0], in_features)


@torch.library.custom_op(f"{_NAMESPACE}::linear_grad_blocks", mutates_args=())
def _grad_blocks(
    grad_output: torch.Tensor,
    x2: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    return KERNELS[kernel].grad_blocks(grad_output, x2, blocks, crow_indices, col_indices)


@_grad_blocks.register_fake
def _(grad_output, x2, blocks, crow_indices, col_indices, kernel):
    return torch.empty_like(blocks, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_NAMESPACE}::linear_backward", mutates_args=())
def _grad_input_and_blocks(
    grad_output: torch.Tensor,
    x2: torch.Tensor,
    blocks: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[kernel].backward(grad_output, x2, blocks, crow_indices, col_indices, in_features)


@_grad_input_and_blocks.register_fake
def _(grad_output, x2, blocks, crow_indices, col_indices, in_features, kernel):
    return (
        grad_output.new_empty(grad_output.shape[0], in_features),
        torch.empty_like(blocks, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x, blocks, _bias, crow_indices, col_indices, in_features, kernel = inputs
    ctx.save_for_backward(x, blocks, crow_indices, col_indices)
    ctx.in_features, ctx.kernel = in_features, kernel


def _backward(ctx, grad_output):
    x, blocks, crow_indices, col_indices = ctx.saved_tensors
    need_x, need_blocks, need_bias = ctx.needs_input_grad[:3]
    kernel, in_features = ctx.kernel, ctx.in_features
    gy = grad_output.reshape(-1, grad_output.shape[-1])
    grad_x = grad_blocks = grad_bias = None
    if need_x and need_blocks and KERNELS[kernel].backward is not None:
        grad_x, grad_blocks = _grad_input_and_blocks(
            gy, x.reshape(-1, in_features), blocks, crow_indices, col_indices, in_features, kernel
        )
        grad_x = grad_x.view(x.shape)
    else:
        if need_x:
            grad_x = _grad_input(gy, blocks, crow_indices, col_indices, in_features, kernel).view(x.shape)
        if need_blocks:
            grad_blocks = _grad_blocks(gy, x.reshape(-1, in_features), blocks, crow_indices, col_indices, kernel)
    if need_bias:
        # the sum in fp32 for half inputs, as the CPU kernel always did
        grad_bias = gy.sum(0, dtype=torch.float32 if gy.dtype in (torch.float16, torch.bfloat16) else None)
        grad_bias = grad_bias.to(grad_output.dtype)
    return grad_x, grad_blocks, grad_bias, None, None, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)
