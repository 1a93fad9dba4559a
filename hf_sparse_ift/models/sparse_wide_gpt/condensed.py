"""Condensed sparse linears: only the active weights, with their input indices, computed without reading a zero.

`CondensedLinear` replaces a masked `SparseLinear` for inference (`condense_model`, ``model.condense()``). Rows (output
neurons) with no active weight — the neurons SRigL ablated — are dropped: their output is the bias alone. The rest
are stored by rows, with input indices sorted within a row:

* constant fan-in k (SRigL): ``values`` and ``col_indices`` are dense ``[rows, k]`` matrices;
* variable fan-in (SET, RigL, static random masks): CSR, ``values`` and ``col_indices`` ``[nnz]`` plus ``row_ptr``
  ``[rows + 1]`` (measured against padding every row to the largest fan-in: see `benchmarks/condensed_inference.py`);
* ``row_ids`` ``[rows]``: the output position of each stored row; ``weight_shape`` ``[2]``: ``(out, in)``.

Indices are int16 when ``in_features`` < 32768 (int32 otherwise): at batch 1 decoding is memory-bound, and every
active weight costs its value plus its index in bytes read per token.

Compute. A small C kernel (`_KERNEL_SOURCE`, compiled once with the system C compiler into a per-CPU cache under
``~/.cache/hf_sparse_ift/kernels`` and loaded with ctypes) walks the rows: ``y[t, row] = bias + sum_p value[p] *
x[t, col[p]]``, accumulating in fp32 (bf16 values are widened exactly). Batch 1 uses one dot product per row; more
tokens use tiles of 16 or 64 tokens so that each stored weight is read once per tile. It runs on
``torch.get_num_threads()`` threads, sharing chunks of rows through a small pthread pool whose caller never waits for
a helper that has not started (an OpenMP join would, and on a machine shared with other processes that wait costs
more than the work). Without a C compiler (a warning says so), with ``HF_SPARSE_IFT_KERNEL=0``, off the CPU, or when a
gradient is needed, the layer computes the same sums with torch: a CSR matmul (`torch.sparse.mm`), or
`torch.nn.functional.embedding_bag` when a gradient is needed; on CPU both are slower than the kernel. The same
library decodes compressed checkpoints (`expand_active`; numpy does it without the library).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONDENSED_FORMAT = "condensed-v1"
REPRESENTATIONS = ("auto", "csr", "padded")

__all__ = [
    "CONDENSED_FORMAT",
    "REPRESENTATIONS",
    "CondensedLinear",
    "condense_model",
    "condensed_layer_shapes",
    "kernel_available",
]


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
_KERNEL_SOURCE = r"""
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float from_f32(float v) { return v; }
static inline float from_bf16(uint16_t v) { uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, 4); return f; }

/* ---- Work sharing. The calling thread works through chunks of a job and helper threads (woken for it) take
   chunks too; the caller waits only for chunks a helper has started. On a machine shared with other processes a
   helper the OS has not scheduled yet simply takes no chunk, where an OpenMP region would wait for it at its join. */
typedef void (*chunk_fn)(const void* ctx, int64_t begin, int64_t end);
typedef struct {
    chunk_fn fn;
    const void* ctx;
    int64_t total, chunk;
    atomic_llong next, done;
    atomic_int refs;
} job_t;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static job_t* pool_job = NULL;
static uint64_t pool_gen = 0;
static int pool_helpers = 0;

static void job_release(job_t* j) { if (atomic_fetch_sub(&j->refs, 1) == 1) free(j); }

static void job_work(job_t* j) {
    for (;;) {
        const int64_t b = atomic_fetch_add(&j->next, j->chunk);
        if (b >= j->total) return;
        const int64_t e = b + j->chunk < j->total ? b + j->chunk : j->total;
        j->fn(j->ctx, b, e);
        atomic_fetch_add(&j->done, e - b);
    }
}

static void* helper_main(void* unused) {
    (void)unused;
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool_mu);
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        job_t* j = pool_job;
        if (j) atomic_fetch_add(&j->refs, 1);
        pthread_mutex_unlock(&pool_mu);
        if (j) {
            job_work(j);
            job_release(j);
        }
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* helpers do not survive fork */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pool_job = NULL;
    pool_helpers = 0;
}

void pool_init(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }  /* called once, from Python */

static void parallel_run(chunk_fn fn, const void* ctx, int64_t total, int64_t chunk, int threads) {
    if (threads <= 1 || total <= chunk) {
        fn(ctx, 0, total);
        return;
    }
    job_t* j = (job_t*)malloc(sizeof(job_t));
    if (!j) {
        fn(ctx, 0, total);
        return;
    }
    j->fn = fn;
    j->ctx = ctx;
    j->total = total;
    j->chunk = chunk;
    atomic_init(&j->next, 0);
    atomic_init(&j->done, 0);
    atomic_init(&j->refs, 1);
    pthread_mutex_lock(&pool_mu);
    while (pool_helpers < threads - 1 && pool_helpers < 255) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool_helpers++;
    }
    pool_job = j;
    pool_gen++;
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    job_work(j);
    while (atomic_load(&j->done) < total) sched_yield();
    pthread_mutex_lock(&pool_mu);
    if (pool_job == j) pool_job = NULL;
    pthread_mutex_unlock(&pool_mu);
    job_release(j);
}

typedef struct {
    const float* x;
    const void* val;
    const void* col;
    const int64_t* row_ptr;
    const int64_t* row_ids;
    const float* bias;
    float* y;
    int64_t rows, in, out, tokens;
} args_t;

/* One token: y[row_ids[r]] = bias[row_ids[r]] + sum_{p in row r} val[p] * x[col[p]]. With AVX2: eight inputs are
   loaded one by one (scalar loads beat the gather instruction on the CPUs measured) into a vector for one FMA with
   eight values. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 val8_f32(const float* v) { return _mm256_loadu_ps(v); }
static inline __m256 val8_bf16(const uint16_t* v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v)), 16));
}
static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define X8(c) _mm256_set_ps(x[(c)[7]], x[(c)[6]], x[(c)[5]], x[(c)[4]], x[(c)[3]], x[(c)[2]], x[(c)[1]], x[(c)[0]])
#define ROW_SUM(VT, LOAD, VAL8)                                                                               \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                            \
        for (; p + 16 <= e; p += 16) {                                                                        \
            a0 = _mm256_fmadd_ps(VAL8(val + p), X8(col + p), a0);                                             \
            a1 = _mm256_fmadd_ps(VAL8(val + p + 8), X8(col + p + 8), a1);                                     \
        }                                                                                                     \
        float s = hsum8(_mm256_add_ps(a0, a1));                                                               \
        for (; p < e; p++) s += LOAD(val[p]) * x[col[p]];
#else
#define ROW_SUM(VT, LOAD, VAL8)                                                                               \
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                                         \
        for (; p + 4 <= e; p += 4) {                                                                          \
            s0 += LOAD(val[p]) * x[col[p]];         s1 += LOAD(val[p + 1]) * x[col[p + 1]];                   \
            s2 += LOAD(val[p + 2]) * x[col[p + 2]]; s3 += LOAD(val[p + 3]) * x[col[p + 3]];                   \
        }                                                                                                     \
        for (; p < e; p++) s0 += LOAD(val[p]) * x[col[p]];                                                    \
        float s = (s0 + s1) + (s2 + s3);
#endif

#define GEMV(NAME, VT, IT, LOAD, VAL8)                                                                        \
static void NAME##_rows(const void* ctx, int64_t r0, int64_t r1) {                                           \
    const args_t* a = (const args_t*)ctx;                                                                     \
    const float* x = a->x;                                                                                    \
    const VT* val = (const VT*)a->val;                                                                        \
    const IT* col = (const IT*)a->col;                                                                        \
    for (int64_t r = r0; r < r1; r++) {                                                                       \
        int64_t p = a->row_ptr[r];                                                                            \
        const int64_t e = a->row_ptr[r + 1];                                                                  \
        ROW_SUM(VT, LOAD, VAL8)                                                                               \
        const int64_t o = a->row_ids[r];                                                                      \
        a->y[o] = s + (a->bias ? a->bias[o] : 0.f);                                                           \
    }                                                                                                         \
}                                                                                                             \
void NAME(const float* x, const VT* val, const IT* col, const int64_t* row_ptr, const int64_t* row_ids,      \
          const float* bias, float* y, int64_t rows, int threads) {                                          \
    const args_t a = {x, val, col, row_ptr, row_ids, bias, y, rows, 0, 0, 1};                                 \
    parallel_run(NAME##_rows, &a, rows, 32, threads);                                                         \
}

/* Many tokens. xb: [blocks, in, TB] (token blocks of TB, zero-padded), y: [tokens, out]. Each stored weight is read
   once per block and multiplies TB contiguous inputs; TB / 8 accumulators of 8 lanes stay in registers. Work items
   are (block, row) pairs. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define SPMM(NAME, VT, IT, LOAD, TB)                                                                          \
static void NAME##_items(const void* ctx, int64_t i0, int64_t i1) {                                          \
    const args_t* a = (const args_t*)ctx;                                                                     \
    const VT* val = (const VT*)a->val;                                                                        \
    const IT* col = (const IT*)a->col;                                                                        \
    for (int64_t i = i0; i < i1; i++) {                                                                       \
        const int64_t b = i / a->rows, r = i % a->rows;                                                       \
        const float* xt = a->x + b * a->in * TB;                                                              \
        v8 acc[TB / 8];                                                                                       \
        for (int j = 0; j < TB / 8; j++) acc[j] = (v8){0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};               \
        for (int64_t p = a->row_ptr[r]; p < a->row_ptr[r + 1]; p++) {                                         \
            const float v = LOAD(val[p]);                                                                     \
            const v8u* xr = (const v8u*)(xt + (int64_t)col[p] * TB);                                          \
            for (int j = 0; j < TB / 8; j++) acc[j] += v * xr[j];                                             \
        }                                                                                                     \
        const int64_t o = a->row_ids[r];                                                                      \
        const float bo = a->bias ? a->bias[o] : 0.f;                                                          \
        const int64_t n = a->tokens - b * TB < TB ? a->tokens - b * TB : TB;                                  \
        for (int64_t j = 0; j < n; j++) a->y[(b * TB + j) * a->out + o] = acc[j / 8][j % 8] + bo;             \
    }                                                                                                         \
}                                                                                                             \
void NAME(const float* xb, const VT* val, const IT* col, const int64_t* row_ptr, const int64_t* row_ids,     \
          const float* bias, float* y, int64_t rows, int64_t in, int64_t out, int64_t tokens, int threads) { \
    const args_t a = {xb, val, col, row_ptr, row_ids, bias, y, rows, in, out, tokens};                        \
    parallel_run(NAME##_items, &a, rows * ((tokens + TB - 1) / TB), 16, threads);                             \
}

/* Compressed-checkpoint decoding (sparse_safetensors.py): bit i of `bits` (LSB first) says whether position i is
   active; active positions take the next value, inactive ones +0 (all bits zero). Writes the bool mask too. Returns
   the number of active positions; never reads outside vals[0, nnz) even if the counts disagree (the caller checks).
   The fast path handles 8 positions per mask byte with one byte shuffle per 16 output bytes. */
#if defined(__SSSE3__)
#include <immintrin.h>
#endif
static uint8_t POP[256];
static uint64_t MASK8[256];
static uint8_t SHUF16[256][16];  /* 2-byte values: 8 positions of one mask byte */
static uint8_t SHUF32[16][16];   /* 4-byte values: 4 positions of one mask nibble */
void init_tables(void) {  /* called once, from Python, right after loading */
    for (int b = 0; b < 256; b++) {
        int r = 0;
        uint64_t m = 0;
        for (int k = 0; k < 8; k++) {
            const int on = (b >> k) & 1;
            m |= (uint64_t)on << (8 * k);
            SHUF16[b][2 * k] = on ? (uint8_t)(2 * r) : 0x80;
            SHUF16[b][2 * k + 1] = on ? (uint8_t)(2 * r + 1) : 0x80;
            r += on;
        }
        POP[b] = (uint8_t)r;
        MASK8[b] = m;
    }
    for (int b = 0; b < 16; b++) {
        int r = 0;
        for (int k = 0; k < 4; k++) {
            const int on = (b >> k) & 1;
            for (int q = 0; q < 4; q++) SHUF32[b][4 * k + q] = on ? (uint8_t)(4 * r + q) : 0x80;
            r += on;
        }
    }
}

#define EXPAND_TAIL(T)                                                                                      \
    for (; i < n; i++) {                                                                                    \
        const int64_t b = (bits[i >> 3] >> (i & 7)) & 1;                                                    \
        out[i] = (b && p < nnz) ? vals[p] : (T)0;                                                           \
        mask[i] = (uint8_t)b;                                                                               \
        p += b;                                                                                             \
    }                                                                                                       \
    return p;

int64_t expand_u8(const uint8_t* bits, const uint8_t* vals, uint8_t* out, uint8_t* mask, int64_t n, int64_t nnz) {
    int64_t i = 0, p = 0;
    EXPAND_TAIL(uint8_t)
}
int64_t expand_u64(const uint8_t* bits, const uint64_t* vals, uint64_t* out, uint8_t* mask, int64_t n, int64_t nnz) {
    int64_t i = 0, p = 0;
    EXPAND_TAIL(uint64_t)
}
int64_t expand_u16(const uint8_t* bits, const uint16_t* vals, uint16_t* out, uint8_t* mask, int64_t n, int64_t nnz) {
    int64_t i = 0, p = 0;
#if defined(__SSSE3__)
    for (; i + 8 <= n && p + 8 <= nnz; i += 8) {
        const uint8_t b = bits[i >> 3];
        const __m128i v = _mm_loadu_si128((const __m128i*)(vals + p));
        _mm_storeu_si128((__m128i*)(out + i), _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i*)SHUF16[b])));
        memcpy(mask + i, &MASK8[b], 8);
        p += POP[b];
    }
#endif
    EXPAND_TAIL(uint16_t)
}
int64_t expand_u32(const uint8_t* bits, const uint32_t* vals, uint32_t* out, uint8_t* mask, int64_t n, int64_t nnz) {
    int64_t i = 0, p = 0;
#if defined(__SSSE3__)
    for (; i + 8 <= n && p + 8 <= nnz; i += 8) {
        const uint8_t b = bits[i >> 3];
        const __m128i lo = _mm_loadu_si128((const __m128i*)(vals + p));
        const int c = POP[b & 15];
        const __m128i hi = _mm_loadu_si128((const __m128i*)(vals + p + c));
        _mm_storeu_si128((__m128i*)(out + i), _mm_shuffle_epi8(lo, _mm_loadu_si128((const __m128i*)SHUF32[b & 15])));
        _mm_storeu_si128((__m128i*)(out + i + 4), _mm_shuffle_epi8(hi, _mm_loadu_si128((const __m128i*)SHUF32[b >> 4])));
        memcpy(mask + i, &MASK8[b], 8);
        p += POP[b];
    }
#endif
    EXPAND_TAIL(uint32_t)
}


GEMV(gemv_f32_i16, float, int16_t, from_f32, val8_f32)
GEMV(gemv_f32_i32, float, int32_t, from_f32, val8_f32)
GEMV(gemv_bf16_i16, uint16_t, int16_t, from_bf16, val8_bf16)
GEMV(gemv_bf16_i32, uint16_t, int32_t, from_bf16, val8_bf16)
SPMM(spmm16_f32_i16, float, int16_t, from_f32, 16)
SPMM(spmm16_f32_i32, float, int32_t, from_f32, 16)
SPMM(spmm16_bf16_i16, uint16_t, int16_t, from_bf16, 16)
SPMM(spmm16_bf16_i32, uint16_t, int32_t, from_bf16, 16)
SPMM(spmm64_f32_i16, float, int16_t, from_f32, 64)
SPMM(spmm64_f32_i32, float, int32_t, from_f32, 64)
SPMM(spmm64_bf16_i16, uint16_t, int16_t, from_bf16, 64)
SPMM(spmm64_bf16_i32, uint16_t, int32_t, from_bf16, 64)
"""

_UNSET = object()
_LIB = _UNSET
_LIB_LOCK = threading.Lock()
_VOID, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("HF_SPARSE_IFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_sparse_ift"
    )
    return Path(root) / "kernels"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile the kernel into `target` atomically (a temporary file in the same folder, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "condensed_kernel.c"
        src.write_text(_KERNEL_SOURCE)
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(src), "-o", str(built)], check=True, capture_output=True, timeout=300)
        os.replace(built, target)


def _load_kernel():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    errors = []
    for flags in (["-O3", "-march=native", "-pthread"], ["-O3", "-pthread"]):
        flags = [*flags, "-std=gnu11", "-ffp-contract=fast", "-shared", "-fPIC"]
        key = hashlib.sha256("\0".join([_KERNEL_SOURCE, compiler, *flags, _cpu_identity()]).encode()).hexdigest()
        target = _cache_dir() / f"condensed-{key[:20]}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(flags)}: {getattr(err, 'stderr', b'') or err}")
            continue
        for name in ("gemv_f32_i16", "gemv_f32_i32", "gemv_bf16_i16", "gemv_bf16_i32"):
            getattr(lib, name).argtypes = [_VOID] * 7 + [_I64, _INT]
            getattr(lib, name).restype = None
        for name in ("init_tables", "pool_init"):
            getattr(lib, name).argtypes, getattr(lib, name).restype = [], None
            getattr(lib, name)()
        for width in (8, 16, 32, 64):
            getattr(lib, f"expand_u{width}").argtypes = [_VOID] * 4 + [_I64, _I64]
            getattr(lib, f"expand_u{width}").restype = _I64
        for tb in (16, 64):
            for name in (f"spmm{tb}_f32_i16", f"spmm{tb}_f32_i32", f"spmm{tb}_bf16_i16", f"spmm{tb}_bf16_i32"):
                getattr(lib, name).argtypes = [_VOID] * 7 + [_I64] * 4 + [_INT]
                getattr(lib, name).restype = None
        return lib
    raise RuntimeError("could not compile the condensed kernel: " + "; ".join(errors))


def _kernel():
    """The compiled kernel library, or None (disabled with HF_SPARSE_IFT_KERNEL=0, or no compiler)."""
    global _LIB
    if _LIB is _UNSET:
        with _LIB_LOCK:
            if _LIB is _UNSET:
                if os.environ.get("HF_SPARSE_IFT_KERNEL", "1").lower() in ("0", "false", "no", "off"):
                    _LIB = None
                else:
                    try:
                        _LIB = _load_kernel()
                    except Exception as err:
                        warnings.warn(
                            f"the CPU kernel of condensed.py is unavailable ({err}): condensed layers "
                            f"compute with torch, slower on CPU than the masked model's matmuls, and compressed "
                            f"checkpoints decode with numpy (the same results). HF_SPARSE_IFT_KERNEL=0 "
                            f"chooses this without the warning.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                        _LIB = None
    return _LIB


def kernel_available() -> bool:
    return _kernel() is not None


def _fresh(n: int, dtype) -> np.ndarray:
    """An uninitialised array whose pages the OS maps in one call (MAP_POPULATE) rather than one fault per page as
    the decoder first writes them. Measured on GPT-3 Small SW-90 (2.6 GB decoded): one fault per page cost 2.4 s;
    transparent huge pages 0.8 s but 8 s whenever the kernel first had to compact memory for them; populated 4 KiB
    pages 1.7 s, without the stalls."""
    nbytes = n * np.dtype(dtype).itemsize
    if nbytes >= 1 << 20 and hasattr(mmap, "MAP_POPULATE"):
        try:
            buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            return np.frombuffer(buffer, dtype=dtype)
        except OSError:
            pass
    return np.empty(n, dtype=dtype)


def expand_active(bits: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(dense values, bool mask) of `n` positions from packed bits and the active values (any 1/2/4/8-byte integer
    view), with the kernel; None when the kernel is unavailable. Raises if the bit count and value count differ."""
    lib = _kernel()
    if lib is None:
        return None
    bits, values = np.ascontiguousarray(bits), np.ascontiguousarray(values)
    out, mask = _fresh(n, values.dtype), _fresh(n, np.bool_)
    active = getattr(lib, f"expand_u{8 * values.itemsize}")(
        bits.ctypes.data, values.ctypes.data, out.ctypes.data, mask.ctypes.data, n, values.size
    )
    if active != values.size:
        raise ValueError(f"{values.size} stored values for a mask with {active} active positions")
    return out, mask


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
def _index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 2**15 - 1 else torch.int32


class CondensedLinear(nn.Module):
    """``y = x Wᵀ + b`` for a sparse ``W`` stored as its active weights and their input indices (see module doc)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rows: int,
        fan_in: int | None = None,
        nnz: int | None = None,
        bias: bool = True,
        index_dtype: torch.dtype | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if (fan_in is None) == (nnz is None):
            raise ValueError("CondensedLinear needs exactly one of fan_in (constant fan-in) or nnz (CSR)")
        if not 0 <= rows <= out_features:
            raise ValueError(f"rows={rows} is invalid: expected 0 <= rows <= out_features={out_features}")
        self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
        index_dtype = index_dtype or _index_dtype(in_features)
        shape = (rows, fan_in) if fan_in is not None else (nnz,)
        self.values = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        self.register_buffer("col_indices", torch.empty(shape, dtype=index_dtype, device=device))
        if fan_in is None:
            self.register_buffer("row_ptr", torch.empty(rows + 1, dtype=torch.int64, device=device))
        self.register_buffer("row_ids", torch.empty(rows, dtype=torch.int64, device=device))
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        self._constant_row_ptr = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, spec: dict, dtype=None, device=None) -> CondensedLinear:
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["rows"],
            fan_in=spec.get("fan_in"),
            nnz=spec.get("nnz"),
            bias=spec["bias"],
            index_dtype=spec.get("index_dtype"),
            device=device,
            dtype=dtype,
        )

    @classmethod
    @torch.no_grad()
    def from_sparse(cls, linear: nn.Linear, representation: str = "auto") -> CondensedLinear:
        """Condense a masked linear (``weight`` with a bool ``weight_mask``). Outputs stay those of the masked layer.

        representation: ``auto`` (``[rows, k]`` when every kept row has the same fan-in, else CSR), ``csr``, or
        ``padded`` (every kept row padded to the largest fan-in with zero weights at input 0).
        """
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation={representation!r} is invalid: expected one of {list(REPRESENTATIONS)}")
        mask = getattr(linear, "weight_mask", None)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != linear.weight.shape:
            raise ValueError(
                f"{type(linear).__name__} has no bool weight_mask of its weight's shape: nothing to condense"
            )
        out_features, in_features = mask.shape
        device, dtype = linear.weight.device, linear.weight.dtype
        m = mask.detach().cpu().numpy()
        fan = m.sum(axis=1)
        kept = np.flatnonzero(fan)
        flat = np.flatnonzero(m[kept].reshape(-1))  # row-major: rows in order, columns sorted within a row
        cols = (flat % in_features).astype(np.int64)
        weight = linear.weight.detach().cpu()
        values = weight[torch.from_numpy(kept)].reshape(-1)[torch.from_numpy(flat)]
        fans = fan[kept]
        index_dtype = _index_dtype(in_features)
        constant = len(fans) > 0 and bool((fans == fans[0]).all())
        bias = linear.bias is not None
        if representation == "csr" or (representation == "auto" and not constant):
            layer = cls(in_features, out_features, len(kept), nnz=len(flat), bias=bias, device="cpu", dtype=dtype)
            layer.values.copy_(values)
            layer.col_indices.copy_(torch.from_numpy(cols))
            layer.row_ptr.copy_(torch.from_numpy(np.concatenate([[0], np.cumsum(fans)]).astype(np.int64)))
        else:
            k = int(fans.max()) if len(fans) else 0
            layer = cls(in_features, out_features, len(kept), fan_in=k, bias=bias, device="cpu", dtype=dtype)
            # Slot j of row r holds its j-th active weight; slots beyond its fan-in (padding) hold 0 at input 0.
            starts = np.concatenate([[0], np.cumsum(fans)[:-1]])
            slot = np.arange(len(flat)) - np.repeat(starts, fans)
            row = np.repeat(np.arange(len(kept)), fans)
            layer.values.zero_()
            layer.col_indices.zero_()
            layer.values[torch.from_numpy(row), torch.from_numpy(slot)] = values
            layer.col_indices[torch.from_numpy(row), torch.from_numpy(slot)] = torch.from_numpy(cols).to(index_dtype)
        layer.row_ids.copy_(torch.from_numpy(kept.astype(np.int64)))
        if bias:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(device)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, mask) of the equivalent masked layer (padding slots of the ``padded`` form are not active)."""
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        row_ptr = self._row_ptr()
        counts = row_ptr[1:] - row_ptr[:-1]
        rows = torch.repeat_interleave(self.row_ids, counts)
        cols = self.col_indices.reshape(-1).long()
        values = self.values.detach().reshape(-1)
        if self.fan_in is not None:  # drop padding slots: input 0 anywhere but the first slot (columns are sorted)
            keep = ~((cols == 0) & (torch.arange(cols.numel(), device=cols.device) % self.fan_in > 0))
            rows, cols, values = rows[keep], cols[keep], values[keep]
        weight[rows, cols] = values
        mask[rows, cols] = True
        return weight, mask

    # -- compute --------------------------------------------------------------------------------
    def _row_ptr(self) -> torch.Tensor:
        if self.fan_in is None:
            return self.row_ptr
        rows = self.values.shape[0]
        cached = self._constant_row_ptr
        if cached is None or cached.device != self.values.device or cached.numel() != rows + 1:
            cached = torch.arange(rows + 1, dtype=torch.int64, device=self.values.device) * self.fan_in
            self._constant_row_ptr = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = _kernel() if x.device.type == "cpu" else None
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.values.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if lib is None or needs_grad or self.values.dtype not in (torch.float32, torch.bfloat16):
            return self._torch_forward(x)
        return _kernel_linear(self, lib, x)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same sums with torch ops: a CSR matmul (MKL / cuSPARSE), or `embedding_bag` when a gradient is needed
        (sparse CSR matmuls have no gradient for their values). Both accumulate bf16 / fp16 in fp32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        row_ptr, cols, values = self._row_ptr(), self.col_indices.reshape(-1), self.values.reshape(-1).to(compute)
        if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
            y_rows = F.embedding_bag(
                cols.long(), x2.t().to(compute).contiguous(), row_ptr[:-1], mode="sum", per_sample_weights=values
            ).t()  # [tokens, rows]
        else:
            index = torch.int32 if values.numel() < 2**31 else torch.int64
            csr = torch.sparse_csr_tensor(
                row_ptr.to(index), cols.to(index), values, (self.row_ids.numel(), self.in_features)
            )
            y_rows = torch.sparse.mm(csr, x2.t().to(compute)).t()
        y = x2.new_zeros(x2.shape[0], self.out_features, dtype=compute).index_copy(1, self.row_ids, y_rows)
        if self.bias is not None:
            y = y + self.bias.to(compute)
        return y.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = f"fan_in={self.fan_in}" if self.fan_in is not None else f"nnz={self.values.numel()} (csr)"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rows={self.row_ids.numel()}, "
            f"{kind}, bias={self.bias is not None}"
        )


def _kernel_linear(layer: CondensedLinear, lib, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward through the C kernel: one dot product per row for one token, token tiles for more."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(torch.float32).contiguous()
    tokens, rows = x2.shape[0], layer.row_ids.numel()
    if rows < layer.out_features:  # dropped rows output their bias
        y = (
            layer.bias.to(torch.float32).expand(tokens, -1).clone()
            if layer.bias is not None
            else x2.new_zeros(tokens, layer.out_features)
        )
    else:
        y = x2.new_empty(tokens, layer.out_features)
    if tokens and rows:
        bias = layer.bias.to(torch.float32).contiguous() if layer.bias is not None else None
        vt = "bf16" if layer.values.dtype == torch.bfloat16 else "f32"
        it = "i16" if layer.col_indices.dtype == torch.int16 else "i32"
        args = (
            layer.values.data_ptr(),
            layer.col_indices.data_ptr(),
            layer._row_ptr().data_ptr(),
            layer.row_ids.data_ptr(),
            bias.data_ptr() if bias is not None else None,
        )
        threads = torch.get_num_threads()
        if tokens == 1:
            getattr(lib, f"gemv_{vt}_{it}")(x2.data_ptr(), *args, y.data_ptr(), rows, threads)
        else:
            tb = 64 if tokens >= 48 else 16
            blocks = -(-tokens // tb)
            xb = x2.new_zeros(blocks * tb, layer.in_features)
            xb[:tokens] = x2
            xb = xb.view(blocks, tb, layer.in_features).transpose(1, 2).contiguous()
            getattr(lib, f"spmm{tb}_{vt}_{it}")(
                xb.data_ptr(), *args, y.data_ptr(), rows, layer.in_features, layer.out_features, tokens, threads
            )
    return y.to(x.dtype).view(*lead, layer.out_features)


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------
def _is_masked_linear(module: nn.Module) -> bool:
    mask = getattr(module, "weight_mask", None)
    return isinstance(module, nn.Linear) and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool


@torch.no_grad()
def condense_model(model: nn.Module, representation: str = "auto") -> nn.Module:
    """Replace every masked sparse linear of `model` by a `CondensedLinear` (in place); returns the model."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation={representation!r} is invalid: expected one of {list(REPRESENTATIONS)}")
    targets = [name for name, module in model.named_modules() if _is_masked_linear(module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CondensedLinear.from_sparse(getattr(parent, child), representation))
    config = getattr(model, "config", None)
    if config is not None and targets:
        config.sparse_format = {"format": CONDENSED_FORMAT}
    return model


_CONDENSED_KEYS = ("values", "col_indices", "row_ids", "weight_shape")
_INDEX_DTYPES = {"I16": torch.int16, "I32": torch.int32, torch.int16: torch.int16, torch.int32: torch.int32}


def _shape_and_dtype(entry):
    """(shape, dtype) of a tensor or of a safetensors slice (dtype as a string such as "I16")."""
    if isinstance(entry, torch.Tensor):
        return tuple(entry.shape), entry.dtype
    return tuple(entry.get_shape()), entry.get_dtype()


def condensed_layer_shapes(sources: dict) -> dict:
    """Layer prefix -> `CondensedLinear.empty` spec, read from checkpoint entries (tensors or safetensors slices)."""
    layers = {}
    for key in sources:
        if not key.endswith(".col_indices"):
            continue
        prefix = key[: -len(".col_indices")]
        missing = [f"{prefix}.{k}" for k in _CONDENSED_KEYS if f"{prefix}.{k}" not in sources]
        if missing:
            raise ValueError(f"condensed layer {prefix!r} is incomplete: missing {missing}")
        value_shape, _ = _shape_and_dtype(sources[f"{prefix}.values"])
        index_shape, index_dtype = _shape_and_dtype(sources[key])
        if value_shape != index_shape:
            raise ValueError(f"condensed layer {prefix!r}: values {value_shape} and col_indices {index_shape} differ")
        if index_dtype not in _INDEX_DTYPES:
            raise ValueError(f"condensed layer {prefix!r}: col_indices dtype {index_dtype} is not int16 or int32")
        out_features, in_features = (int(v) for v in sources[f"{prefix}.weight_shape"][...].tolist())
        spec = {
            "in_features": in_features,
            "out_features": out_features,
            "bias": f"{prefix}.bias" in sources,
            "rows": _shape_and_dtype(sources[f"{prefix}.row_ids"])[0][0],
            "index_dtype": _INDEX_DTYPES[index_dtype],
        }
        if len(value_shape) == 2:
            spec["fan_in"] = value_shape[1]
        else:
            spec["nnz"] = value_shape[0]
        layers[prefix] = spec
    return layers
