"""The CPU kernel of `block_sparse_linear`: one BLAS call per active block on contiguous column blocks of the input.

* forward ``Y[:, r] = sum_c X[:, c] W_rc^T``, with few tokens (decoding) one batched GEMM over all active blocks;
* input gradient ``dX[:, c] = sum_r dY[:, r] W_rc``, through the transposed BSR index;
* block gradients ``dW_rc = dY[:, r]^T X[:, c]``, at active blocks only.

The block-rows (block-columns for ``dX``) are shared out to a pool of threads, one per torch thread, each running
single-threaded GEMMs: torch releases the GIL inside them, and one thread per core beats letting every small GEMM
spread over all cores (see ``benchmarks/block_sparse.py`` for the measurements). bf16/fp16 inputs are multiplied in
fp32: products of bf16 values are exact in fp32 and the sums are fp32, as in a bf16 GEMM, only rounded once at the
end; fp32 GEMMs are 4-15x faster than bf16 ones on CPUs without bf16 matrix instructions (measured on the 2-core AMD
EPYC CI machine).

Every function takes 2-d operands (tokens, features) and returns results in the input's dtype; the autograd
Function in `block_sparse.py` reshapes and calls them.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .block_sparse_layout import BlockSparseKernel, block_rows_of

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


def forward(x2: torch.Tensor, blocks: torch.Tensor, bias, crow_indices, col_indices) -> torch.Tensor:
    """``x2 W^T + bias`` for the (tokens, in_features) input ``x2``."""
    n_rows = crow_indices.numel() - 1
    _, block_rows, block_cols = blocks.shape
    compute = _cpu_compute_dtype(x2.dtype)
    out_dtype = x2.dtype
    x2 = x2.to(compute).contiguous()
    tokens = x2.shape[0]
    if tokens <= FEW_TOKENS:
        return _few_tokens_forward(x2, blocks.to(compute), crow_indices, col_indices, bias).to(out_dtype)
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
    return y.to(out_dtype)


def grad_input(gy: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, in_features: int) -> torch.Tensor:
    """``dX = dY W`` for the (tokens, out_features) output gradient ``gy``."""
    _, block_rows, block_cols = blocks.shape
    n_cols = in_features // block_cols
    compute = _cpu_compute_dtype(gy.dtype)
    out_dtype = gy.dtype
    gy = gy.to(compute)
    tokens = gy.shape[0]
    gy_rows = _block_major(gy, block_rows)
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
    return grad_x2.to(out_dtype)


def grad_blocks(gy: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices) -> torch.Tensor:
    """``dW_rc = dY[:, r]^T X[:, c]`` at the active blocks, shaped and typed like ``blocks``."""
    _, block_rows, block_cols = blocks.shape
    compute = _cpu_compute_dtype(gy.dtype)
    gy_rows = _block_major(gy.to(compute), block_rows)
    x_cols = _block_major(x2.to(compute), block_cols)
    starts, cols = crow_indices.tolist(), col_indices.tolist()
    n_rows = len(starts) - 1
    grad = gy_rows[0].new_empty(blocks.shape) if gy_rows else gy.new_empty(blocks.shape, dtype=compute)
    grad_block_list = grad.unbind(0)

    def block_rows_task(r0: int, r1: int) -> None:
        for r in range(r0, r1):
            for j in range(starts[r], starts[r + 1]):
                torch.mm(gy_rows[r].t(), x_cols[cols[j]], out=grad_block_list[j])

    _run_balanced(block_rows_task, starts, n_rows)
    return grad.to(blocks.dtype)


KERNEL = BlockSparseKernel("cpu", forward, grad_input, grad_blocks)
