"""The Triton kernel of `block_sparse_linear`: three kernels over the active blocks of a BSR weight, for CUDA tensors
(and CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests check them without a GPU).

* forward ``Y[:, r] = sum_c X[:, c] W_rc^T (+ b)``: one program per (token tile, block-row), looping over the
  block-row's active blocks; an empty block-row writes the bias (or zeros);
* input gradient ``dX[:, c] = sum_r dY[:, r] W_rc``: one program per (token tile, block-column), reaching the same
  block storage through a transposed index (a permutation of the block ids ordered by block-column, and column
  pointers): no values are moved, only ``n_active`` integers sorted;
* block gradients ``dW_rc = dY[:, r]^T X[:, c]`` at the active blocks only: one program per (active block, token
  split); with more than one split, fp32 partial sums are added up afterwards (deterministic, no atomics).

Every launch grid depends on the shapes alone (tokens, features, number of active blocks), never on which blocks are
active: a DST update changes index tensors, recompiles nothing, and the kernels can be captured in a CUDA graph (no
host synchronisation: the loop bounds are read from the index tensors inside the kernels). The transposed index is
rebuilt from the index tensors at every backward (a sort of ``n_active`` integers): a cached one would go stale when
a captured graph is replayed after an in-place DST update.

Square blocks of 16, 32, 64 or 128; fp16 and bf16 with fp32 accumulation, and fp32 (as ``torch.matmul`` on the GPU:
TF32 only where torch allows it, ``torch.backends.cuda.matmul.allow_tf32``). Indices in int32 (the layer's int64
index is converted, a copy of ``n_active`` integers); every offset into the data is computed in int64.

Triton is optional: without it this file still imports (loading a model compiles nothing; Triton compiles a kernel at
its first call on a GPU) and `unavailable` says why the kernel cannot run. It travels with checkpoints as remote code,
so it imports triton only inside ``try``.

Not measured on a GPU yet (``benchmarks/gpu_block_sparse.py``); the tile sizes are fixed per block size and dtype,
not tuned.
"""

from __future__ import annotations

import functools

import torch

from .block_sparse_layout import BlockSparseKernel

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the kernel is optional: everything else runs without it
    triton = tl = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None

BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:
    # The token counts are not specialised on (their divisibility by 16 buys nothing: they only bound masks), so a
    # ragged batch reuses the compiled kernels.

    @triton.jit(do_not_specialize=["n_tokens"])
    def _forward_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        y_ptr,
        crow_ptr,
        col_ptr,
        n_tokens,
        stride_x,
        stride_y,
        HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # one (BLOCK_M tokens) x (one block-row of BLOCK outputs) tile
        pid_m = tl.program_id(0)
        row = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK)
        offs_k = tl.arange(0, BLOCK_K)
        in_range = offs_m < n_tokens
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
        start = tl.load(crow_ptr + row)
        end = tl.load(crow_ptr + row + 1)
        STEPS: tl.constexpr = BLOCK // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
        # one flat loop over (active block, K slice of it), so the loads of the next step can be pipelined
        for step in range(start * STEPS, end * STEPS):
            block = step // STEPS
            k0 = (step % STEPS) * BLOCK_K
            col = tl.load(col_ptr + block)
            x = tl.load(x_rows + (col * BLOCK + k0 + offs_k)[None, :], mask=in_range[:, None], other=0.0)
            # W_rc^T slice: element (k, n) of the transposed block is blocks[block, n, k0 + k]
            w_block = w_ptr + block.to(tl.int64) * (BLOCK * BLOCK)
            w = tl.load(w_block + offs_n[None, :] * BLOCK + (k0 + offs_k)[:, None])
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + row * BLOCK + offs_n).to(tl.float32)[None, :]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + (row * BLOCK + offs_n)[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=in_range[:, None])

    @triton.jit(do_not_specialize=["n_tokens"])
    def _grad_input_kernel(
        gy_ptr,
        w_ptr,
        dx_ptr,
        ccol_ptr,
        order_ptr,
        rows_ptr,
        n_tokens,
        stride_gy,
        stride_dx,
        BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # one (BLOCK_M tokens) x (one block-column of BLOCK inputs) tile; the block-column's blocks are
        # order[ccol[c]:ccol[c + 1]], in block-rows rows[ccol[c]:ccol[c + 1]]
        pid_m = tl.program_id(0)
        col = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK)
        offs_k = tl.arange(0, BLOCK_K)
        in_range = offs_m < n_tokens
        gy_rows = gy_ptr + offs_m.to(tl.int64)[:, None] * stride_gy
        start = tl.load(ccol_ptr + col)
        end = tl.load(ccol_ptr + col + 1)
        STEPS: tl.constexpr = BLOCK // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
        for step in range(start * STEPS, end * STEPS):
            t = step // STEPS
            k0 = (step % STEPS) * BLOCK_K
            block = tl.load(order_ptr + t)
            row = tl.load(rows_ptr + t)
            gy = tl.load(gy_rows + (row * BLOCK + k0 + offs_k)[None, :], mask=in_range[:, None], other=0.0)
            # rows k0.. of W_rc, as stored
            w_block = w_ptr + block.to(tl.int64) * (BLOCK * BLOCK)
            w = tl.load(w_block + (k0 + offs_k)[:, None] * BLOCK + offs_n[None, :])
            if UPCAST:
                gy, w = gy.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(gy, w, acc, input_precision=PRECISION)
        dx = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dx + (col * BLOCK + offs_n)[None, :]
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=in_range[:, None])

    @triton.jit(do_not_specialize=["n_tokens", "n_active", "tokens_per_split"])
    def _grad_blocks_kernel(
        gy_ptr,
        x_ptr,
        out_ptr,
        rows_ptr,
        col_ptr,
        n_tokens,
        n_active,
        tokens_per_split,
        stride_gy,
        stride_x,
        BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # dW of one active block over one split of the tokens: dY[m0:m1, r]^T X[m0:m1, c]
        block = tl.program_id(0)
        split = tl.program_id(1)
        row = tl.load(rows_ptr + block)
        col = tl.load(col_ptr + block)
        offs_i = tl.arange(0, BLOCK)
        offs_m = tl.arange(0, BLOCK_M)
        m_start = split * tokens_per_split
        m_end = tl.minimum(n_tokens, m_start + tokens_per_split)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            m = m0 + offs_m
            in_range = m < m_end
            m64 = m.to(tl.int64)
            # dY^T slice (BLOCK outputs, BLOCK_M tokens) and X slice (BLOCK_M tokens, BLOCK inputs)
            gy = tl.load(
                gy_ptr + m64[None, :] * stride_gy + (row * BLOCK + offs_i)[:, None], mask=in_range[None, :], other=0.0
            )
            x = tl.load(
                x_ptr + m64[:, None] * stride_x + (col * BLOCK + offs_i)[None, :], mask=in_range[:, None], other=0.0
            )
            if UPCAST:
                gy, x = gy.to(tl.float32), x.to(tl.float32)
            acc = tl.dot(gy, x, acc, input_precision=PRECISION)
        out = out_ptr + (split.to(tl.int64) * n_active + block) * (BLOCK * BLOCK)
        tl.store(out + offs_i[:, None] * BLOCK + offs_i[None, :], acc.to(out_ptr.dtype.element_ty))

    # The interpreter (TRITON_INTERPRET=1 when this file was imported) makes plain Python functions of the kernels.
    # Its bf16 arithmetic is wrong and its fp32 -> bf16 casts truncate, so there the kernels multiply 16-bit tiles in
    # fp32 (as exact as a GPU's fp32 accumulation) and write bf16 results as fp32, which torch then rounds.
    INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)
else:
    INTERPRETED = False


def unavailable(block_shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> str | None:
    """Why this kernel cannot compute on these operands, or None when it can."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR}); `pip install triton` (CUDA builds of torch bring it)"
    rows, cols = block_shape
    if rows != cols or rows not in BLOCK_SIZES:
        return f"it needs square blocks of {', '.join(map(str, BLOCK_SIZES))}; these are {rows}x{cols}"
    if dtype not in DTYPES:
        return f"it computes in float16, bfloat16 or float32, not {dtype}"
    if device.type == "cpu" and not INTERPRETED:
        return "on CPU tensors it runs only in Triton's interpreter (TRITON_INTERPRET=1 before hf_sparse_ift loads)"
    if device.type not in ("cuda", "cpu"):
        return f"it runs on CUDA tensors, not {device.type}"
    return None


def _tiles(block: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options (fixed, not tuned): (BLOCK_M tokens, BLOCK_K reduction) tiles, warps, stages."""
    wide = dtype == torch.float32
    return {
        "BLOCK_M": 64 if block == 128 and wide else 128,
        "BLOCK_K": min(block, 32 if wide else 64),
        "num_warps": 8 if block == 128 else 4,
        "num_stages": 2 if wide else 3,
    }


def _grad_tiles(block: int, dtype: torch.dtype) -> dict:
    """The block-gradient kernel's options: the token slice it reduces over per step, warps, stages."""
    wide = dtype == torch.float32
    return {"BLOCK_M": 32 if wide or block == 128 else 64, "num_warps": 8 if block == 128 else 4, "num_stages": 3}


def _common(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"  # 16-bit products are exact in the fp32 accumulator whatever the setting
    return {"UPCAST": INTERPRETED and dtype != torch.float32, "PRECISION": precision}


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes: the input's, but fp32 for bf16 in the interpreter (see INTERPRETED)."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def _check(x2: torch.Tensor, blocks: torch.Tensor) -> None:
    reason = unavailable(tuple(blocks.shape[1:]), x2.dtype, x2.device)
    if reason is not None:
        raise RuntimeError(f"block_sparse_linear: the triton kernel cannot compute here: {reason}")


def _block_rows(crow_indices: torch.Tensor, n_active: int) -> torch.Tensor:
    """The block-row of every active block, int32; without a host synchronisation (unlike repeat_interleave)."""
    ids = torch.arange(n_active, device=crow_indices.device, dtype=crow_indices.dtype)
    return (torch.searchsorted(crow_indices, ids, right=True) - 1).to(torch.int32)


def transposed_index(crow_indices: torch.Tensor, col_indices: torch.Tensor, n_cols: int):
    """The index of W^T over the same block storage: (column pointers (n_cols + 1,), block ids ordered by
    block-column (n_active,), their block-rows (n_active,)), int32. Only index tensors are sorted."""
    order = torch.argsort(col_indices, stable=True)
    columns = torch.arange(n_cols + 1, device=col_indices.device, dtype=col_indices.dtype)
    ccol = torch.searchsorted(col_indices[order], columns)
    rows = _block_rows(crow_indices, col_indices.numel())[order]
    return ccol.to(torch.int32), order.to(torch.int32), rows


LAUNCH_OPTIONS = ("num_warps", "num_stages")  # the launch options among a launch's keywords; the rest are constexprs


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``: every launch goes through here (the compile-only test reads the arguments
    here to compile each kernel as the JIT would specialise it)."""
    kernel[grid](*args, **meta)


def forward(x2: torch.Tensor, blocks: torch.Tensor, bias, crow_indices, col_indices) -> torch.Tensor:
    _check(x2, blocks)
    x2, blocks = x2.contiguous(), blocks.contiguous()
    block = blocks.shape[1]
    n_rows = crow_indices.numel() - 1
    n_tokens = x2.shape[0]
    y = torch.empty(n_tokens, n_rows * block, dtype=_result_dtype(x2.dtype), device=x2.device)
    if n_tokens == 0 or n_rows == 0:
        return y.to(x2.dtype)
    tiles = _tiles(block, x2.dtype)
    grid = (triton.cdiv(n_tokens, tiles["BLOCK_M"]), n_rows)
    _launch(
        _forward_kernel,
        grid,
        x2,
        blocks,
        bias,
        y,
        crow_indices.to(torch.int32),
        col_indices.to(torch.int32),
        n_tokens,
        x2.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK=block,
        **tiles,
        **_common(x2.dtype),
    )
    return y.to(x2.dtype)


def grad_input(gy: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, in_features: int) -> torch.Tensor:
    _check(gy, blocks)
    gy, blocks = gy.contiguous(), blocks.contiguous()
    block = blocks.shape[1]
    n_cols = in_features // block
    n_tokens = gy.shape[0]
    dx = torch.empty(n_tokens, in_features, dtype=_result_dtype(gy.dtype), device=gy.device)
    if n_tokens == 0 or n_cols == 0:
        return dx.to(gy.dtype)
    ccol, order, rows = transposed_index(crow_indices, col_indices, n_cols)
    tiles = _tiles(block, gy.dtype)
    grid = (triton.cdiv(n_tokens, tiles["BLOCK_M"]), n_cols)
    _launch(
        _grad_input_kernel,
        grid,
        gy,
        blocks,
        dx,
        ccol,
        order,
        rows,
        n_tokens,
        gy.stride(0),
        dx.stride(0),
        BLOCK=block,
        **tiles,
        **_common(gy.dtype),
    )
    return dx.to(gy.dtype)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def token_splits(n_active: int, n_tokens: int, block_m: int, device: torch.device) -> int:
    """How many token splits the block gradients take: enough programs for about two per multiprocessor, each
    split at least 4 token slices long; 1 off the GPU (the interpreter runs one program at a time)."""
    if device.type != "cuda" or n_active == 0:
        return 1
    wanted = triton.cdiv(2 * _multiprocessors(device.index or 0), n_active)
    return max(1, min(wanted, n_tokens // (4 * block_m)))


def grad_blocks(
    gy: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, splits: int | None = None
) -> torch.Tensor:
    _check(x2, blocks)
    gy, x2 = gy.contiguous(), x2.contiguous()
    n_active, block = blocks.shape[0], blocks.shape[1]
    n_tokens = x2.shape[0]
    if n_active == 0:
        return torch.empty_like(blocks)
    tiles = _grad_tiles(block, x2.dtype)
    if splits is None:
        splits = token_splits(n_active, n_tokens, tiles["BLOCK_M"], x2.device)
    tokens_per_split = triton.cdiv(triton.cdiv(max(1, n_tokens), splits), tiles["BLOCK_M"]) * tiles["BLOCK_M"]
    # one split writes the gradient itself; more write fp32 partial sums, added up below
    if splits == 1:
        out = torch.empty(blocks.shape, dtype=_result_dtype(blocks.dtype), device=blocks.device)
    else:
        out = torch.empty(splits, *blocks.shape, dtype=torch.float32, device=blocks.device)
    _launch(
        _grad_blocks_kernel,
        (n_active, splits),
        gy,
        x2,
        out,
        _block_rows(crow_indices, n_active),
        col_indices.to(torch.int32),
        n_tokens,
        n_active,
        tokens_per_split,
        gy.stride(0),
        x2.stride(0),
        BLOCK=block,
        **tiles,
        **_common(x2.dtype),
    )
    return (out if splits == 1 else out.sum(0)).to(blocks.dtype)


KERNEL = BlockSparseKernel("triton", forward, grad_input, grad_blocks)
