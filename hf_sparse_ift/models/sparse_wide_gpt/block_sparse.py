"""Block-sparse matrix products on the active blocks of a weight stored in BSR layout.

Layout (the one `torch.sparse_bsr_tensor` uses): a weight of shape (out_features, in_features) cut into blocks of
(block_rows, block_cols); ``blocks`` holds the active ones, shape (n_active, block_rows, block_cols), ordered by
block-row and within a row by block-column; ``crow_indices`` (out_features // block_rows + 1, int64) says where each
block-row's blocks start in ``blocks``; ``col_indices`` (n_active, int64) is each block's block-column.

`block_sparse_linear(x, blocks, crow_indices, col_indices, in_features, bias)` is ``F.linear(x, W, bias)`` for the
dense ``W`` those blocks describe, with gradients for ``x``, ``blocks`` (active blocks only) and ``bias``. It picks
one of three paths, all with the same results:

* CPU: `_BlockSparseLinearCPU`, one BLAS call per active block on strided views of the input, in forward
  (``Y[:, r] = sum_c X[:, c] W_rc^T``), for the input gradient (``dX[:, c] = sum_r dY[:, r] W_rc``) and for the block
  gradients (``dW_rc = dY[:, r]^T X[:, c]``, only at active blocks). The block-rows (block-columns for ``dX``) are
  shared out to a pool of threads, one per torch thread, each running single-threaded GEMMs: torch releases the
  GIL inside them, and one thread per core beats letting every small GEMM spread over all cores (see
  ``benchmarks/block_sparse.py`` for the measurements). bf16/fp16 inputs are multiplied in fp32 on CPU: products of
  bf16 values are exact in fp32 and the sums are fp32, as in a bf16 GEMM, only rounded once at the end; fp32 GEMMs
  are 4-15x faster than bf16 ones on CPUs without bf16 matrix instructions (measured on the 2-core AMD EPYC CI
  machine).
* CUDA: torch's BSR kernels (Triton ``bsr_dense_mm`` behind ``bsr @ dense``) for forward and ``dX``, and one
  batched GEMM per group of blocks for ``dW``. Not measured yet (no GPU where this was written).
* anything else (meta tensors, DTensors, other devices): `block_sparse_linear_reference`, which materialises the
  dense weight.

Under autocast the inputs are cast to the autocast dtype first, as `F.linear` does, so gradients reach fp32
master blocks through the cast.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

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
        return kernel.apply(x, blocks, bias, crow_indices, col_indices, in_features)


def _kernel_for(x, blocks, crow_indices, col_indices, bias) -> type[torch.autograd.Function] | None:
    """The Function that computes on these inputs, or None for the reference."""
    tensors = (x, blocks, crow_indices, col_indices) + (() if bias is None else (bias,))
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):  # DTensor, fake or other subclasses
        return None
    if x.device.type == "cpu":
        return _BlockSparseLinearCPU
    if x.device.type == "cuda" and _bsr_kernels_take(blocks.shape[1:], x.dtype, x.numel() // max(1, x.shape[-1])):
        return _BlockSparseLinearBSR
    return None


def _bsr_kernels_take(block_shape: torch.Size, dtype: torch.dtype, tokens: int) -> bool:
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


# ----------------------------------------------------------------------------------------------
# CPU: one GEMM per active block on strided views, block-rows shared out to single-threaded workers
# ----------------------------------------------------------------------------------------------
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _single_threaded_worker() -> None:
    # Each worker runs its GEMMs on one core; the pool has one worker per torch thread. `set_num_threads` also
    # writes torch's process-wide default, which the creating thread restores in `_pool` once the workers are up.
    torch.set_num_threads(1)
    torch.get_num_threads()  # settles this thread's setting before the default is restored


def _pool(n_workers: int) -> ThreadPoolExecutor:
    """The pool of `n_workers` single-threaded workers (made once per size, all workers started)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(n_workers)
        if pool is None:
            threads = torch.get_num_threads()
            started = threading.Barrier(n_workers)
            pool = ThreadPoolExecutor(n_workers, thread_name_prefix="block_sparse", initializer=_single_threaded_worker)
            # one task per worker, each waiting for all the others, so every worker runs its initializer now
            for future in [pool.submit(started.wait) for _ in range(n_workers)]:
                future.result()
            torch.set_num_threads(threads)
            _POOLS[n_workers] = pool
        return pool


def _run_balanced(task, starts: list[int], n_groups: int) -> None:
    """``task(g0, g1)`` over groups [0, n_groups) (block-rows or block-columns, whose blocks start at ``starts``),
    in chunks of about equal work shared out to the pool; inline when torch runs on one thread."""
    n_workers = torch.get_num_threads()
    if n_workers == 1 or n_groups == 1:
        task(0, n_groups)
        return
    # a few chunks per worker so a worker slowed down by other processes does not hold up the rest
    n_chunks = min(n_groups, 4 * n_workers)
    work = starts[-1] + n_groups  # one unit per block, plus one per group (its copy-out)
    bounds, g = [0], 0
    for i in range(1, n_chunks):
        while g < n_groups and starts[g] + g < work * i / n_chunks:
            g += 1
        if g > bounds[-1]:
            bounds.append(g)
    bounds.append(n_groups)
    inference = torch.is_inference_mode_enabled()
    pool = _pool(n_workers)
    futures = [pool.submit(_in_worker, task, a, b, inference) for a, b in itertools.pairwise(bounds) if b > a]
    for future in futures:
        future.result()


def _in_worker(task, start: int, end: int, inference: bool) -> None:
    # grad and inference modes are per thread: the products inside a Function record nothing, and tensors made
    # under the caller's inference mode may only be written under it
    with torch.inference_mode(inference), torch.no_grad():
        task(start, end)


def _block_major(matrix: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """The column blocks of a (tokens, features) matrix as contiguous (tokens, block_size) matrices: one copy,
    after which every GEMM reads contiguous operands (strided ones made MKL's small GEMMs about 1.6x slower)."""
    tokens = matrix.shape[0]
    return matrix.view(tokens, -1, block_size).transpose(0, 1).contiguous().unbind(0)


# Up to this many tokens (decoding), the forward is a few batched ops over all blocks instead of one GEMM per block:
# with a token or a few, a GEMM per block costs mostly its Python call (~20k blocks per SW-75 token).
FEW_TOKENS = 16


def _few_tokens_forward(x2, blocks, crow_indices, col_indices, bias) -> torch.Tensor:
    """``x2 W^T + b`` as one batched GEMM over the active blocks, then a sum of each block-row's partial outputs."""
    n_rows = crow_indices.numel() - 1
    tokens = x2.shape[0]
    _, block_rows, block_cols = blocks.shape
    x_blocks = x2.view(tokens, -1, block_cols).index_select(1, col_indices).transpose(0, 1)  # (n_active, tokens, cols)
    partial = torch.bmm(x_blocks, blocks.transpose(1, 2))  # (n_active, tokens, block_rows)
    y = partial.new_zeros(n_rows, tokens, block_rows).index_add_(0, block_rows_of(crow_indices), partial)
    y = y.transpose(0, 1).reshape(tokens, n_rows * block_rows)
    return y if bias is None else y.add_(bias)


def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _BlockSparseLinearCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, bias, crow_indices, col_indices, in_features):
        n_rows = crow_indices.numel() - 1
        _, block_rows, block_cols = blocks.shape
        compute = _cpu_compute_dtype(x.dtype)
        x2 = x.reshape(-1, in_features).to(compute).contiguous()
        tokens = x2.shape[0]
        ctx.save_for_backward(x, blocks, crow_indices, col_indices)
        ctx.in_features = in_features
        if tokens <= FEW_TOKENS:
            y = _few_tokens_forward(x2, blocks.to(compute), crow_indices, col_indices, bias)
            return y.to(x.dtype).view(*x.shape[:-1], n_rows * block_rows)
        starts, cols = crow_indices.tolist(), col_indices.tolist()
        x_cols = _block_major(x2, block_cols)
        weights_t = [w.t() for w in blocks.to(compute).unbind(0)]
        y = x2.new_empty(tokens, n_rows * block_rows)
        y_rows = y.view(tokens, n_rows, block_rows).unbind(1)
        bias_rows = None if bias is None else bias.to(compute).view(n_rows, block_rows).unbind(0)

        def rows(r0: int, r1: int) -> None:
            accumulator = x2.new_empty(tokens, block_rows)  # contiguous: GEMMs into it beat GEMMs into y's columns
            for r in range(r0, r1):
                first, end = starts[r], starts[r + 1]
                if first == end:
                    y_rows[r].copy_(bias_rows[r]) if bias_rows is not None else y_rows[r].zero_()
                    continue
                torch.mm(x_cols[cols[first]], weights_t[first], out=accumulator)
                for j in range(first + 1, end):
                    accumulator.addmm_(x_cols[cols[j]], weights_t[j])
                if bias_rows is not None:
                    accumulator.add_(bias_rows[r])
                y_rows[r].copy_(accumulator)

        _run_balanced(rows, starts, n_rows)
        return y.to(x.dtype).view(*x.shape[:-1], n_rows * block_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, blocks, crow_indices, col_indices = ctx.saved_tensors
        need_x, need_blocks, need_bias = ctx.needs_input_grad[:3]
        n_rows = crow_indices.numel() - 1
        _, block_rows, block_cols = blocks.shape
        in_features = ctx.in_features
        n_cols = in_features // block_cols
        compute = _cpu_compute_dtype(x.dtype)
        gy = grad_output.reshape(-1, n_rows * block_rows).to(compute)
        tokens = gy.shape[0]
        gy_rows = _block_major(gy, block_rows)
        starts, cols = crow_indices.tolist(), col_indices.tolist()
        grad_x = grad_blocks = grad_bias = None

        if need_x:
            weights = blocks.to(compute).unbind(0)
            # the blocks of each block-column, in block-row order (stable sort): the transposed BSR index
            by_column = torch.argsort(col_indices, stable=True).tolist()
            column_starts = [0] + torch.bincount(col_indices, minlength=n_cols).cumsum(0).tolist()
            block_row = block_rows_of(crow_indices).tolist()
            grad_x2 = gy.new_empty(tokens, in_features)
            grad_x_cols = grad_x2.view(tokens, n_cols, block_cols).unbind(1)

            def columns(c0: int, c1: int) -> None:
                accumulator = gy.new_empty(tokens, block_cols)
                for c in range(c0, c1):
                    first, end = column_starts[c], column_starts[c + 1]
                    if first == end:
                        grad_x_cols[c].zero_()
                        continue
                    j = by_column[first]
                    torch.mm(gy_rows[block_row[j]], weights[j], out=accumulator)
                    for j in by_column[first + 1 : end]:
                        accumulator.addmm_(gy_rows[block_row[j]], weights[j])
                    grad_x_cols[c].copy_(accumulator)

            _run_balanced(columns, column_starts, n_cols)
            grad_x = grad_x2.to(x.dtype).view(x.shape)

        if need_blocks:
            x_cols = _block_major(x.reshape(-1, in_features).to(compute), block_cols)
            grad_blocks_c = gy.new_empty(blocks.shape)
            grad_block_list = grad_blocks_c.unbind(0)

            def block_rows_task(r0: int, r1: int) -> None:
                for r in range(r0, r1):
                    if starts[r] == starts[r + 1]:
                        continue
                    for j in range(starts[r], starts[r + 1]):
                        torch.mm(gy_rows[r].t(), x_cols[cols[j]], out=grad_block_list[j])

            _run_balanced(block_rows_task, starts, n_rows)
            grad_blocks = grad_blocks_c.to(blocks.dtype)

        if need_bias:
            grad_bias = gy.sum(0).to(grad_output.dtype)
        return grad_x, grad_blocks, grad_bias, None, None, None


# ----------------------------------------------------------------------------------------------
# CUDA: torch's BSR kernels (Triton on recent GPUs) for Y and dX, batched GEMMs for dW at active blocks. The same
# code runs on CPU tensors (torch's CPU BSR kernels), which is how the tests check it without a GPU.
# ----------------------------------------------------------------------------------------------
class _BlockSparseLinearBSR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, bias, crow_indices, col_indices, in_features):
        n_rows = crow_indices.numel() - 1
        out_features = n_rows * blocks.shape[1]
        x2 = x.reshape(-1, in_features)
        weight = torch.sparse_bsr_tensor(crow_indices, col_indices, blocks, size=(out_features, in_features))
        y = (weight @ x2.t().contiguous()).t()  # BSR @ dense gives (out_features, tokens)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, blocks, crow_indices, col_indices)
        ctx.in_features = in_features
        return y.contiguous().view(*x.shape[:-1], out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, blocks, crow_indices, col_indices = ctx.saved_tensors
        need_x, need_blocks, need_bias = ctx.needs_input_grad[:3]
        n_rows = crow_indices.numel() - 1
        n_active, block_rows, block_cols = blocks.shape
        in_features = ctx.in_features
        gy = grad_output.reshape(-1, n_rows * block_rows)
        grad_x = grad_blocks = grad_bias = None
        if need_x:
            # W^T in BSR: the blocks transposed, ordered by block-column
            order = torch.argsort(col_indices, stable=True)
            counts = torch.bincount(col_indices, minlength=in_features // block_cols)
            crow_t = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            weight_t = torch.sparse_bsr_tensor(
                crow_t,
                block_rows_of(crow_indices)[order],
                blocks[order].transpose(1, 2).contiguous(),
                size=(in_features, n_rows * block_rows),
            )
            grad_x = (weight_t @ gy.t().contiguous()).t().reshape(x.shape)
        if need_blocks:
            x2 = x.reshape(-1, in_features)
            x_blocks = x2.view(-1, in_features // block_cols, block_cols)
            gy_blocks = gy.view(-1, n_rows, block_rows)
            rows = block_rows_of(crow_indices)
            grad_blocks = torch.empty_like(blocks)
            # groups of blocks so the gathered inputs stay within about 256 MiB
            group = max(1, (1 << 26) // max(1, gy.shape[0] * (block_rows + block_cols)))
            for start in range(0, n_active, group):
                end = min(n_active, start + group)
                a = gy_blocks[:, rows[start:end]].permute(1, 2, 0)  # (blocks, block_rows, tokens)
                b = x_blocks[:, col_indices[start:end]].transpose(0, 1)  # (blocks, tokens, block_cols)
                torch.bmm(a, b, out=grad_blocks[start:end])
        if need_bias:
            grad_bias = gy.sum(0)
        return grad_x, grad_blocks, grad_bias, None, None, None
