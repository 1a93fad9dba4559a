"""The CPU kernel of `block_sparse_linear`: a native kernel built ahead of time, else the same products with torch.

* forward ``Y[:, r] = sum_c X[:, c] W_rc^T`` (block-row r, its blocks' columns c);
* input gradient ``dX[:, c] = sum_r dY[:, r] W_rc``, through the transposed BSR index;
* block gradients ``dW_rc = dY[:, r]^T X[:, c]``, at active blocks only.

Native kernel (``block_sparse_kernel.c``, fp32, blocks whose sides are multiples of 16). ``hf-sparse-ift
build-kernels`` compiles it into the kernel cache; `load_kernel` opens it only if its build record vouches for it
(`native_kernels`), and never compiles. Each product is a sum of small dense products, block by block, computed by
one register-tiled micro-kernel on block-major copies of the inputs (made in the library, into scratch tensors
allocated here) while the block stays in L1; the design and what it replaced are in the source's header. With at most
`DOT_TOKENS` tokens (decoding) the forward reads every block once, in its stored layout. `backward` computes both
gradients in one pass over the block-columns (the bits of the two separate passes) where there are enough block-columns
for the threads. It runs on
``torch.get_num_threads()`` threads of the calling thread: torch's OpenMP threads, or the library's own with
``HF_SPARSE_IFT_KERNEL_THREADS=own`` (``kernel_pool.h``); it reads no torch or OpenMP setting other than that count
and changes none.
``HF_SPARSE_IFT_KERNEL=0`` turns it off. Without it (or for other block shapes) a one-time message says the layers
compute with torch:

Torch path. One BLAS call per active block on contiguous column blocks of the input; with few tokens (`FEW_TOKENS`)
one batched GEMM over all blocks. The block-rows (block-columns for ``dX``) are shared out to a pool of worker threads,
one per torch thread, each running single-threaded GEMMs (torch releases the GIL inside them; one thread per core
beats letting every small GEMM spread over all cores). A worker makes itself single-threaded with the thread-local
settings of the OpenMP and MKL libraries torch runs on (``omp_set_num_threads`` and ``mkl_set_num_threads_local``
called on the worker's own thread): ``torch.set_num_threads``, which also rewrites the default every new thread of
the process starts with, is never called, so no other thread's setting changes, now or later. Where those libraries
cannot be found, there is no pool and the products run on the calling thread, threaded by torch as usual.

bf16/fp16 inputs are multiplied in fp32 on both paths: products of bf16 values are exact in fp32 and the sums are
fp32, as in a bf16 GEMM, only rounded once at the end (fp32 GEMMs are 4-15x faster than bf16 ones on CPUs without
bf16 matrix instructions). Both paths give the reference's results up to the order of the fp32 sums.

Every function takes 2-d operands (tokens, features) and returns results in the input's dtype; the autograd
Function in `block_sparse.py` reshapes and calls them. Measurements: ``benchmarks/block_sparse.py``.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .block_sparse_layout import BlockSparseKernel, block_rows_of
from .native_kernels import (
    DISABLE_VARIABLE,
    OPENMP_RUNTIMES,
    build_record,
    disabled,
    kernel_threads,
    library_path,
    loaded_library,
    open_library,
    requested_threads,
    unusable,
)


def _logger():
    # imported when first needed: importing transformers while this module loads (sparse_layers imports it) would
    # start the package's Auto-class registration in the middle of the model folder's imports
    from transformers.utils import logging

    return logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# the native kernel
# ----------------------------------------------------------------------------------------------
STEM = "block-sparse"
SOURCE = Path(__file__).with_name("block_sparse_kernel.c")
# Bumped whenever a function's signature in block_sparse_kernel.c changes; the library reports its own
# (`block_sparse_kernel_abi`) and a library of another version is not used.
KERNEL_ABI = 3
ABI_FUNCTION = "block_sparse_kernel_abi"
# Up to this many tokens the native forward reads each block once and takes dot products (decoding); more tokens go
# through the register-tiled products on block-major inputs.
DOT_TOKENS = 4

_UNSET = object()
_library = _UNSET
_library_lock = threading.Lock()


def declare(lib) -> None:
    """Argument and result types of the library's functions (ctypes passes them unchecked otherwise)."""
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "bsr_forward": [pointer] * 8 + [i64] * 5,
        "bsr_forward_dot": [pointer] * 6 + [i64] * 5,
        "bsr_grad_input": [pointer] * 7 + [i64] * 5,
        "bsr_grad_blocks": [pointer] * 7 + [i64] * 6,
        "bsr_backward": [pointer] * 11 + [i64] * 6,
    }
    for name, arguments in signatures.items():
        getattr(lib, name).argtypes = [*arguments, ctypes.c_int]
        getattr(lib, name).restype = None


def load_kernel():
    """The built native library, or None: disabled (``HF_SPARSE_IFT_KERNEL=0``), not built, damaged or unusable.
    Never builds. Decided once per process, with one message saying which path block-sparse layers take on CPU."""
    global _library
    if _library is not _UNSET:
        return _library
    with _library_lock:
        if _library is not _UNSET:
            return _library
        path = library_path(STEM, KERNEL_ABI)
        lib = None
        requested_threads()  # a bad HF_SPARSE_IFT_KERNEL_THREADS is refused whether or not a library is built
        if disabled():
            _logger().info(
                f"Block-sparse layers compute with torch on CPU ({DISABLE_VARIABLE}=0 turns the native kernel off)."
            )
        elif (reason := unusable(path, SOURCE)) is not None:
            _logger().warning(
                f"Block-sparse layers compute with torch on CPU: {reason}. That is slower than the native kernel; "
                "build it with `hf-sparse-ift build-kernels` (needs a C compiler)."
            )
        else:
            try:
                lib = open_library(path, ABI_FUNCTION, KERNEL_ABI, declare)
                _logger().info(f"Block-sparse layers compute with the native kernel {path} on CPU.")
            except (OSError, AttributeError) as err:  # a bad HF_SPARSE_IFT_KERNEL_THREADS (UsageError) is raised
                _logger().warning(
                    f"Block-sparse layers compute with torch on CPU: the native kernel {path} cannot be used ({err}). "
                    "Rebuild it with `hf-sparse-ift build-kernels`."
                )
        _library = lib
    return _library


def forget() -> None:
    """Decide afresh at the next `load_kernel` (after a build)."""
    global _library
    _library = _UNSET


def kernel_info() -> dict | None:
    """Where the native kernel in use came from (path and build record), or None when the torch path runs."""
    if load_kernel() is None:
        return None
    path = library_path(STEM, KERNEL_ABI)
    return {"path": str(path), "threads": kernel_threads(path), **build_record(path)}


NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def native_refuses(block_shape: tuple[int, int]) -> str | None:
    """Why the native kernel does not compute with blocks of this shape (the torch path does), or None."""
    block_rows, block_cols = block_shape
    if block_rows % 16 or block_cols % 16:
        return f"its blocks' sides must be multiples of 16, these are {block_rows}x{block_cols}"
    return None


def _native_for(blocks: torch.Tensor):
    """The native library when it computes with these blocks (`native_refuses`, a float dtype), else None."""
    if native_refuses(tuple(blocks.shape[1:])) is not None or blocks.dtype not in NATIVE_DTYPES:
        return None
    return load_kernel()


def _block_major(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """(features / block_size, tokens, block_size): the column blocks of a (tokens, features) matrix, each contiguous."""
    return matrix.view(matrix.shape[0], -1, block_size).transpose(0, 1).contiguous()


# Scratch for the native kernel's block-major copies, kept per calling thread and reused: a fresh allocation this
# large is mapped anew by the C allocator each call, and faulting its pages in cost a fifth of the input and block
# gradients' time (GPT-3 Small SW-75 MLP-in, 2048 tokens, 2026-12-03). Requests above the cap are allocated and dropped.
WORKSPACE_CAP_BYTES = 512 * 2**20


class _Workspace(threading.local):
    buffer: torch.Tensor | None = None


_WORKSPACE = _Workspace()


def scratch(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """fp32 tensors of these shapes, contents undefined, valid until this thread's next call (views of one buffer)."""
    sizes = [math.prod(shape) for shape in shapes]
    needed = sum(sizes)
    buffer = _WORKSPACE.buffer
    if buffer is None or buffer.numel() < needed:
        buffer = torch.empty(needed, dtype=torch.float32)
        if needed * 4 <= WORKSPACE_CAP_BYTES:
            _WORKSPACE.buffer = buffer
    views, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        views.append(buffer[start : start + size].view(shape))
        start += size
    return views


def release_workspace() -> None:
    """Free this thread's scratch buffer (it is made again at the next call that needs one)."""
    _WORKSPACE.buffer = None


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def _native_forward(lib, x2, blocks, bias, crow_indices, col_indices) -> torch.Tensor:
    n_rows = crow_indices.numel() - 1
    _, block_rows, block_cols = blocks.shape
    tokens, in_features = x2.shape
    x, weights = _fp32(x2), _fp32(blocks)
    bias32 = None if bias is None else _fp32(bias)
    crow, col = crow_indices.contiguous(), col_indices.contiguous()
    y = x.new_empty(tokens, n_rows * block_rows)
    bias_pointer = None if bias32 is None else bias32.data_ptr()
    shape = (tokens, in_features, n_rows, block_rows, block_cols, torch.get_num_threads())
    # the tensors stay referenced until the call returns (a data_ptr does not keep its tensor alive)
    if tokens <= DOT_TOKENS:
        lib.bsr_forward_dot(x.data_ptr(), weights.data_ptr(), crow.data_ptr(), col.data_ptr(), bias_pointer,
                            y.data_ptr(), *shape)  # fmt: skip
    else:
        x_scratch, blocks_scratch = scratch(x.shape, weights.shape)  # block-major x, blocks transposed
        lib.bsr_forward(x.data_ptr(), weights.data_ptr(), crow.data_ptr(), col.data_ptr(), bias_pointer, y.data_ptr(),
                        x_scratch.data_ptr(), blocks_scratch.data_ptr(), *shape)  # fmt: skip
    return y.to(x2.dtype)


def _transposed_index(crow_indices, col_indices, n_cols: int):
    """The blocks of each block-column in block-row order (stable sort), where each column's start, each block's row."""
    by_column = torch.argsort(col_indices, stable=True)
    column_starts = torch.cat([col_indices.new_zeros(1), torch.bincount(col_indices, minlength=n_cols).cumsum(0)])
    return by_column, column_starts, block_rows_of(crow_indices)


# The fused backward (`bsr_backward`) shares work out by block-column, one column per item: with fewer than this many
# columns per thread the last items leave threads idle, and the two separate passes (token tiles x columns, blocks)
# run instead. Both give the same bits.
FUSED_BACKWARD_COLUMNS_PER_THREAD = 3


def _native_backward(lib, gy, x2, blocks, crow_indices, col_indices, in_features):
    n_rows = crow_indices.numel() - 1
    n_active, block_rows, block_cols = blocks.shape
    tokens = gy.shape[0]
    n_cols = in_features // block_cols
    gy32, x, weights = _fp32(gy), _fp32(x2), _fp32(blocks)
    by_column, column_starts, block_row = _transposed_index(crow_indices, col_indices, n_cols)
    # the longest columns first, so the items left at the end are short ones
    columns = torch.argsort(column_starts.diff(), descending=True, stable=True)
    grad_x = gy32.new_empty(tokens, in_features)
    grad = gy32.new_empty(blocks.shape)
    gy_scratch, x_scratch = scratch(gy32.shape, x.shape)  # block-major copies
    lib.bsr_backward(gy32.data_ptr(), x.data_ptr(), weights.data_ptr(), by_column.data_ptr(), column_starts.data_ptr(),
                     block_row.data_ptr(), columns.data_ptr(), grad_x.data_ptr(), grad.data_ptr(),
                     gy_scratch.data_ptr(), x_scratch.data_ptr(), n_active, tokens, in_features, n_rows, block_rows,
                     block_cols, torch.get_num_threads())  # fmt: skip
    return grad_x.to(gy.dtype), grad.to(blocks.dtype)


def _native_grad_input(lib, gy, blocks, crow_indices, col_indices, in_features) -> torch.Tensor:
    n_rows = crow_indices.numel() - 1
    _, block_rows, block_cols = blocks.shape
    tokens = gy.shape[0]
    gy32, weights = _fp32(gy), _fp32(blocks)
    by_column, column_starts, block_row = _transposed_index(crow_indices, col_indices, in_features // block_cols)
    grad_x = gy32.new_empty(tokens, in_features)
    (gy_scratch,) = scratch(gy32.shape)  # block-major gy
    lib.bsr_grad_input(gy32.data_ptr(), weights.data_ptr(), by_column.data_ptr(), column_starts.data_ptr(),
                       block_row.data_ptr(), grad_x.data_ptr(), gy_scratch.data_ptr(),
                       tokens, in_features, n_rows, block_rows, block_cols, torch.get_num_threads())  # fmt: skip
    return grad_x.to(gy.dtype)


def _native_grad_blocks(lib, gy, x2, blocks, crow_indices, col_indices) -> torch.Tensor:
    n_rows = crow_indices.numel() - 1
    n_active, block_rows, block_cols = blocks.shape
    tokens, in_features = x2.shape
    gy32, x = _fp32(gy), _fp32(x2)
    col, block_row = col_indices.contiguous(), block_rows_of(crow_indices)
    grad = gy32.new_empty(blocks.shape)
    gy_scratch, x_scratch = scratch(gy32.shape, x.shape)  # block-major copies
    lib.bsr_grad_blocks(gy32.data_ptr(), x.data_ptr(), col.data_ptr(), block_row.data_ptr(), grad.data_ptr(),
                        gy_scratch.data_ptr(), x_scratch.data_ptr(), n_active, tokens, in_features, n_rows,
                        block_rows, block_cols, torch.get_num_threads())  # fmt: skip
    return grad.to(blocks.dtype)


def backward(gy: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, in_features: int):
    """``(grad_input(...), grad_blocks(...))`` in one pass where the native kernel takes them (the same bits)."""
    lib = _native_for(blocks)
    n_cols = in_features // blocks.shape[2]
    if lib is not None and n_cols >= FUSED_BACKWARD_COLUMNS_PER_THREAD * torch.get_num_threads():
        return _native_backward(lib, gy, x2, blocks, crow_indices, col_indices, in_features)
    return (
        grad_input(gy, blocks, crow_indices, col_indices, in_features),
        grad_blocks(gy, x2, blocks, crow_indices, col_indices),
    )


# ----------------------------------------------------------------------------------------------
# the torch path
# ----------------------------------------------------------------------------------------------
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_UNKNOWN = object()
_thread_setters = _UNKNOWN


def _worker_thread_setters():
    """Functions that set the calling thread's own OpenMP and MKL thread counts in the libraries torch runs on, or
    None where they cannot be found (then the torch path has no worker pool)."""
    global _thread_setters
    if _thread_setters is not _UNKNOWN:
        return _thread_setters
    setters = None
    try:
        omp = next(p for p in map(loaded_library, OPENMP_RUNTIMES) if p)
        setters = [ctypes.CDLL(omp).omp_set_num_threads]
        if torch.backends.mkl.is_available():  # MKL keeps its own per-thread count, set when torch first runs here
            setters.append(ctypes.CDLL(loaded_library("libtorch_cpu")).MKL_Set_Num_Threads_Local)  # C interface
    except (StopIteration, OSError, AttributeError, TypeError):
        setters = None
    _thread_setters = setters
    return setters


def _single_threaded_worker(setters) -> None:
    # torch first initialises this thread's settings from the process default (doing it now keeps it from
    # overriding what follows at the first parallel op), then the thread alone is made single-threaded
    torch.get_num_threads()
    for set_threads in setters:
        set_threads(1)


def _pool(n_workers: int) -> ThreadPoolExecutor | None:
    """The pool of `n_workers` single-threaded workers (made once per size), or None where workers cannot be made
    single-threaded without touching process-wide settings."""
    setters = _worker_thread_setters()
    if setters is None:
        return None
    with _POOLS_LOCK:
        pool = _POOLS.get(n_workers)
        if pool is None:
            pool = ThreadPoolExecutor(
                n_workers,
                thread_name_prefix="block_sparse",
                initializer=_single_threaded_worker,
                initargs=(setters,),
            )
            _POOLS[n_workers] = pool
        return pool


def _run_balanced(task, starts: list[int], n_groups: int) -> None:
    """``task(g0, g1)`` over groups [0, n_groups) (block-rows or block-columns, whose blocks start at ``starts``),
    in chunks of about equal work shared out to the pool; inline when torch runs on one thread or there is no pool."""
    n_workers = torch.get_num_threads()
    pool = None if n_workers == 1 or n_groups == 1 else _pool(n_workers)
    if pool is None:
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
    futures = [pool.submit(_in_worker, task, a, b, inference) for a, b in itertools.pairwise(bounds) if b > a]
    for future in futures:
        future.result()


def _in_worker(task, start: int, end: int, inference: bool) -> None:
    # grad and inference modes are per thread: the products inside a Function record nothing, and tensors made
    # under the caller's inference mode may only be written under it
    with torch.inference_mode(inference), torch.no_grad():
        task(start, end)


def _column_blocks(matrix: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """The column blocks of a (tokens, features) matrix as contiguous (tokens, block_size) matrices: one copy,
    after which every GEMM reads contiguous operands (strided ones made MKL's small GEMMs about 1.6x slower)."""
    return _block_major(matrix, block_size).unbind(0)


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
    lib = _native_for(blocks)
    if lib is not None:
        return _native_forward(lib, x2, blocks, bias, crow_indices, col_indices)
    return torch_forward(x2, blocks, bias, crow_indices, col_indices)


def grad_input(gy: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, in_features: int) -> torch.Tensor:
    """``dX = dY W`` for the (tokens, out_features) output gradient ``gy``."""
    lib = _native_for(blocks)
    if lib is not None:
        return _native_grad_input(lib, gy, blocks, crow_indices, col_indices, in_features)
    return torch_grad_input(gy, blocks, crow_indices, col_indices, in_features)


def grad_blocks(gy: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices) -> torch.Tensor:
    """``dW_rc = dY[:, r]^T X[:, c]`` at the active blocks, shaped and typed like ``blocks``."""
    lib = _native_for(blocks)
    if lib is not None:
        return _native_grad_blocks(lib, gy, x2, blocks, crow_indices, col_indices)
    return torch_grad_blocks(gy, x2, blocks, crow_indices, col_indices)


def torch_forward(x2: torch.Tensor, blocks: torch.Tensor, bias, crow_indices, col_indices) -> torch.Tensor:
    """`forward` with torch ops."""
    n_rows = crow_indices.numel() - 1
    _, block_rows, block_cols = blocks.shape
    compute = _cpu_compute_dtype(x2.dtype)
    out_dtype = x2.dtype
    x2 = x2.to(compute).contiguous()
    tokens = x2.shape[0]
    if tokens <= FEW_TOKENS:
        return _few_tokens_forward(x2, blocks.to(compute), crow_indices, col_indices, bias).to(out_dtype)
    starts, cols = crow_indices.tolist(), col_indices.tolist()
    x_cols = _column_blocks(x2, block_cols)
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


def torch_grad_input(
    gy: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices, in_features: int
) -> torch.Tensor:
    """`grad_input` with torch ops."""
    _, block_rows, block_cols = blocks.shape
    n_cols = in_features // block_cols
    compute = _cpu_compute_dtype(gy.dtype)
    out_dtype = gy.dtype
    gy = gy.to(compute)
    tokens = gy.shape[0]
    gy_rows = _column_blocks(gy, block_rows)
    weights = blocks.to(compute).unbind(0)
    # the blocks of each block-column, in block-row order (stable sort): the transposed BSR index
    by_column, column_starts, block_row = (t.tolist() for t in _transposed_index(crow_indices, col_indices, n_cols))
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


def torch_grad_blocks(
    gy: torch.Tensor, x2: torch.Tensor, blocks: torch.Tensor, crow_indices, col_indices
) -> torch.Tensor:
    """`grad_blocks` with torch ops."""
    _, block_rows, block_cols = blocks.shape
    compute = _cpu_compute_dtype(gy.dtype)
    gy_rows = _column_blocks(gy.to(compute), block_rows)
    x_cols = _column_blocks(x2.to(compute), block_cols)
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


KERNEL = BlockSparseKernel("cpu", forward, grad_input, grad_blocks, backward)
