/* The native CPU kernel of block-sparse linears (block_sparse_cpu.py), fp32: the forward, the input gradient and the
   block gradients of y = x W^T + b for a weight stored as its active (BR x BC) blocks in BSR order. Built ahead of
   time by `hf-sparse-ift build-kernels`, never while a model loads; without a built library the same products run
   through torch (block_sparse_cpu.py), with equal results up to the order of the fp32 sums.

   Every product is a sum of small dense products A_p B_p, one per block, computed by one register-tiled
   micro-kernel: a tile of MR rows x up to PANEL columns of the result (64 on AVX-512, 16 on AVX2) is held in vector
   registers over one block's K (BR or BC, or a chunk of tokens), added to the tile's running sum and stored. The
   block loop is outside the row loop, so a block's B (a PANEL-wide slice of it: 16 KB for 64-blocks on AVX-512)
   stays in L1 while every row of a sub-tile of tokens uses it; the running sums of a sub-tile (SUB_TOKENS rows)
   stay in an L1-sized buffer and the block's last product writes the result. (Summing a whole block-row in
   registers instead, the first version, streamed all of the row's blocks from L2 for every MR rows and ran at 55%
   of the FMA peak.) In this order the sums are the same as before: block by block, k by k.

   The token-major operands are first copied block-major, (features / block, tokens, block), in one pass that reads
   the rows in order: then the rows of one block are contiguous. Read in place, rows 6 or 24 KB apart fall into a
   few L1 sets and cross a page per row, where the hardware prefetchers stop; copying them per block and per use
   took a fifth of the time. The forward also copies its blocks transposed once (each is read as K x BR).

   BR and BC must be multiples of 16 (one AVX-512 vector, a PANEL on AVX2).

   With up to DOT_TOKENS tokens (decoding) the forward reads each block once, in its stored layout, and takes one
   dot product per output per token: decoding is memory-bound and this reads no byte twice.

   Work is shared as kernel_pool.h says (torch's OpenMP threads, or the library's own). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kernel_pool.h"

/* A tile is MR rows x NV vectors of VW floats of accumulators, NV <= NV_MAX: PANEL columns. The vectors are the
   machine's own (GCC vector extensions): wider ones, split by the compiler, put the accumulators on the stack
   (AVX2 with 16-float vectors: 11-13 GFLOP/s where 8-float ones give 85, 97% of the AVX2 FMA peak; built with
   -mavx2 -mfma and run on an AVX-512 machine, one thread, 2026-12-03). */
#define MR 6
#if defined(__AVX512F__)
#define VW 16
#define NV_MAX 4 /* 6 x 4 accumulators + 4 loaded vectors + 1 broadcast fit the 32 AVX-512 registers */
typedef float vec __attribute__((vector_size(64)));
typedef float vecu __attribute__((vector_size(64), aligned(4)));
/* a broadcast (vbroadcastss from memory); `(vec){0} + v` would add 0.0 first, a port-5 instruction per use */
static inline vec splat(float v) { return (vec){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }
#else
#define VW 8
#define NV_MAX 2 /* 6 x 2 accumulators + 2 loaded + 1 broadcast fit the 16 AVX2 registers (the 6 x 16 tile of AVX2 BLAS
                    kernels); not yet measured on an AVX2-only CPU */
typedef float vec __attribute__((vector_size(32)));
typedef float vecu __attribute__((vector_size(32), aligned(4)));
static inline vec splat(float v) { return (vec){v, v, v, v, v, v, v, v}; }
#endif
#define PANEL (VW * NV_MAX)
#define DOT_TOKENS 4
#define SUB_TOKENS 48   /* rows of a sub-tile: its running sums (48 x 64 floats, 12 KB) stay in L1 with a block */
#define TILE_TOKENS 384 /* tokens of one work item (forward, input gradient) */
#define GRAD_CHUNK 128  /* tokens summed per pass over a block gradient (its tiles reloaded once a pass) */
#define BACKWARD_TOKENS 96 /* tokens of one step of the fused backward (below): 24 KB of one block-row of dY */
#define CONVERT_TOKENS 16

static inline vec load(const float* p) { return *(const vecu*)p; }
static inline void store(float* p, vec v) { *(vecu*)p = v; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* C[m, n] = C_in[m, n] + sum_{k < K} A[m, k] B[k, n] for m < mr, n < VW nv, where A[m, k] = a[m * a_m + k * a_k],
   B[k, n] = b[k * ldb + n], C[m, n] = c[m * ldc + n] and C_in[m, n] = c_in[m * ld_in + n] (zero when c_in is NULL;
   ld_in = 0 adds one row, the bias, to every row). mr and nv are constants after inlining, so the accumulators stay
   in registers. */
static inline __attribute__((always_inline)) void tile(const int mr, const int nv, const float* a, int64_t a_m,
                                                       int64_t a_k, const float* b, int64_t ldb, int64_t K,
                                                       const float* c_in, int64_t ld_in, float* c, int64_t ldc) {
    vec acc[MR][NV_MAX]; /* mr <= MR, nv <= NV_MAX */
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) acc[m][v] = c_in ? load(c_in + m * ld_in + VW * v) : splat(0.f);
    for (int64_t k = 0; k < K; k++) {
        vec bv[NV_MAX];
        for (int v = 0; v < nv; v++) bv[v] = load(b + k * ldb + VW * v);
        for (int m = 0; m < mr; m++) {
            const vec av = splat(a[m * a_m + k * a_k]);
            for (int v = 0; v < nv; v++) acc[m][v] += av * bv[v];
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) store(c + m * ldc + VW * v, acc[m][v]);
}

#if NV_MAX == 4
#define TILE_CASES(MR_)                                                             \
    switch (nv) {                                                                   \
        case 1: tile(MR_, 1, a, a_m, a_k, b, ldb, K, c_in, ld_in, c, ldc); break;   \
        case 2: tile(MR_, 2, a, a_m, a_k, b, ldb, K, c_in, ld_in, c, ldc); break;   \
        case 3: tile(MR_, 3, a, a_m, a_k, b, ldb, K, c_in, ld_in, c, ldc); break;   \
        default: tile(MR_, 4, a, a_m, a_k, b, ldb, K, c_in, ld_in, c, ldc); break;  \
    }
#else
#define TILE_CASES(MR_)                                                           \
    if (nv == 1)                                                                  \
        tile(MR_, 1, a, a_m, a_k, b, ldb, K, c_in, ld_in, c, ldc);                \
    else                                                                          \
        tile(MR_, 2, a, a_m, a_k, b, ldb, K, c_in, ld_in, c, ldc);
#endif
#define TILE_FUNCTION(NAME, MR_)                                                                                  \
    static void NAME(int nv, const float* a, int64_t a_m, int64_t a_k, const float* b, int64_t ldb, int64_t K, \
                     const float* c_in, int64_t ld_in, float* c, int64_t ldc) {                                  \
        TILE_CASES(MR_)                                                                                           \
    }
TILE_FUNCTION(tile_full, MR)
TILE_FUNCTION(tile_four, 4)
TILE_FUNCTION(tile_one, 1)

/* C (rows x n) = C_in + A B, in PANEL-column panels and MR-row tiles (then 4 and 1 for the rest); the operands as
   for `tile`, C_in rows ld_in apart. */
static void product(int64_t rows, int64_t n, const float* a, int64_t a_m, int64_t a_k, const float* b, int64_t ldb,
                    int64_t K, const float* c_in, int64_t ld_in, float* c, int64_t ldc) {
    for (int64_t n0 = 0; n0 < n; n0 += PANEL) {
        const int nv = (int)(min64(n - n0, PANEL) / VW);
        const float* bn = b + n0;
        int64_t m = 0;
#define AT(M) a + (M) * a_m, a_m, a_k, bn, ldb, K, c_in ? c_in + (M) * ld_in + n0 : NULL, ld_in, c + (M) * ldc + n0, ldc
        for (; m + MR <= rows; m += MR) tile_full(nv, AT(m));
        for (; m + 4 <= rows; m += 4) tile_four(nv, AT(m));
        for (; m < rows; m++) tile_one(nv, AT(m));
#undef AT
    }
}

/* rows x n of c (rows ldc apart) = row (n entries) in every row, or zero when row is NULL */
static void fill(int64_t rows, int64_t n, const float* row, float* c, int64_t ldc) {
    for (int64_t m = 0; m < rows; m++) {
        if (row)
            memcpy(c + m * ldc, row, sizeof(float) * (size_t)n);
        else
            memset(c + m * ldc, 0, sizeof(float) * (size_t)n);
    }
}

/* An output this large is a fresh mapping from the C allocator at every call (glibc maps every allocation above
   32 MB anew), and the kernel's first writes fault its pages in: 4 KB at a time, that took a third of the forward of
   GPT-3 Small SW-75 MLP-in (50 MB of output; 132 vs 85-98 ms into a buffer written before, AMD EPYC, 2 threads,
   2026-12-03). Asking for huge pages on the output's own range (a hint the kernel ignores where transparent huge
   pages are off) makes that 2 MB at a time: 100-108 ms. Nothing else changes: no process setting, no other memory. */
#define HUGE_OUTPUT_BYTES (32u << 20)
static void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (bytes >= HUGE_OUTPUT_BYTES && e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}

static void* alloc_floats(int64_t n) { return aligned_alloc(64, ((size_t)n * sizeof(float) + 63) / 64 * 64); }

/* ---- layout copies */
typedef struct {
    const float* src;
    float* dst;
    int64_t tokens, features, block;
} copy_t;

/* dst (features / block, tokens, block) = the column blocks of src (tokens, features), CONVERT_TOKENS rows at a time:
   those rows (in L1/L2) are read block by block, each block's rows written as one contiguous run */
static void block_major_items(const void* ctx, int64_t i0, int64_t i1) {
    const copy_t* s = (const copy_t*)ctx;
    const int64_t nb = s->features / s->block;
    const size_t bytes = sizeof(float) * (size_t)s->block;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t t0 = i * CONVERT_TOKENS, t1 = min64(t0 + CONVERT_TOKENS, s->tokens);
        for (int64_t c = 0; c < nb; c++)
            for (int64_t t = t0; t < t1; t++)
                memcpy(s->dst + (c * s->tokens + t) * s->block, s->src + t * s->features + c * s->block, bytes);
    }
}

static void block_major(const float* src, float* dst, int64_t tokens, int64_t features, int64_t block, int threads) {
    const copy_t s = {src, dst, tokens, features, block};
    parallel_run(block_major_items, &s, (tokens + CONVERT_TOKENS - 1) / CONVERT_TOKENS, 1, threads);
}

typedef struct {
    const float* w;
    float* wt;
    int64_t br, bc;
} transpose_t;

/* wt[j] (bc x br) = w[j]^T for blocks [j0, j1), in 16 x 16 pieces */
static void transpose_items(const void* ctx, int64_t j0, int64_t j1) {
    const transpose_t* s = (const transpose_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    for (int64_t j = j0; j < j1; j++) {
        const float* w = s->w + j * bb;
        float* t = s->wt + j * bb;
        for (int64_t a0 = 0; a0 < br; a0 += 16)
            for (int64_t b0 = 0; b0 < bc; b0 += 16)
                for (int64_t a = a0; a < a0 + 16; a++)
                    for (int64_t b = b0; b < b0 + 16; b++) t[b * br + a] = w[a * bc + b];
    }
}

typedef struct {
    const float *x, *w, *bias, *gy;
    float *out, *grad_blocks;
    const int64_t *crow, *col, *order, *cstart, *row_of, *columns;
    int64_t tokens, in, outf, n_rows, n_cols, br, bc, token_tiles;
} args_t;

/* ---- forward: item = (token tile, block-row r), token-major, so the tile's input is reused across block-rows.
   Y[t, r] = bias_r + sum_p X[t, col_p] W_p^T over the row's blocks: x block-major (in / bc, tokens, bc), the blocks
   transposed, wt (n_active, bc, br). */
static void forward_items(const void* ctx, int64_t i0, int64_t i1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    float* sum = (float*)alloc_floats(SUB_TOKENS * br);
    for (int64_t i = i0; i < i1; i++) {
        const int64_t r = i % s->n_rows, t0 = (i / s->n_rows) * TILE_TOKENS, t1 = min64(t0 + TILE_TOKENS, s->tokens);
        const int64_t first = s->crow[r], last = s->crow[r + 1] - 1;
        const float* bias = s->bias ? s->bias + r * br : NULL;
        for (int64_t u = t0; u < t1; u += SUB_TOKENS) {
            const int64_t rows = min64(t1 - u, SUB_TOKENS);
            float* y = s->out + u * s->outf + r * br;
            if (last < first) fill(rows, br, bias, y, s->outf);
            for (int64_t p = first; p <= last; p++)
                product(rows, br, s->x + (s->col[p] * s->tokens + u) * bc, bc, 1, s->w + p * bb, br, bc,
                        p > first ? sum : bias, p > first ? br : 0, p < last ? sum : y, p < last ? br : s->outf);
        }
    }
    free(sum);
}

/* y (tokens x n_rows*br) = x W^T + bias. x: (tokens, in); w: (n_active, br, bc); crow: n_rows + 1; col: n_active;
   bias: NULL or n_rows*br. Scratch: x_bm, tokens * in floats; wt, n_active * br * bc floats. */
void bsr_forward(const float* x, const float* w, const int64_t* crow, const int64_t* col, const float* bias, float* y,
                 float* x_bm, float* wt, int64_t tokens, int64_t in, int64_t n_rows, int64_t br, int64_t bc,
                 int threads) {
    advise_huge_pages(y, sizeof(float) * (size_t)(tokens * n_rows * br));
    block_major(x, x_bm, tokens, in, bc, threads);
    const transpose_t t = {w, wt, br, bc};
    parallel_run(transpose_items, &t, crow[n_rows], 8, threads);
    args_t s = {0};
    s.x = x_bm, s.w = wt, s.bias = bias, s.out = y, s.crow = crow, s.col = col;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.n_rows = n_rows, s.br = br, s.bc = bc;
    s.token_tiles = (tokens + TILE_TOKENS - 1) / TILE_TOKENS;
    parallel_run(forward_items, &s, n_rows * s.token_tiles, 1, threads);
}

/* ---- forward with few tokens: item = block-row; each block is read once in its stored layout (BR x BC), and
   every output is one dot product per token over the row's blocks. */
static inline float hsum(vec v) {
    float s = 0.f;
    for (int k = 0; k < VW; k++) s += v[k];
    return s;
}

static void forward_dot_items(const void* ctx, int64_t r0, int64_t r1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc, nv = bc / VW;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t first = s->crow[r], end = s->crow[r + 1];
        for (int64_t t0 = 0; t0 < s->tokens; t0 += DOT_TOKENS) {
            const int64_t nt = s->tokens - t0 < DOT_TOKENS ? s->tokens - t0 : DOT_TOKENS;
            const float* x0 = s->x + t0 * s->in;
            float* y0 = s->out + t0 * s->outf + r * br;
            for (int64_t a = 0; a < br; a++) {
                vec acc[DOT_TOKENS];
                for (int64_t t = 0; t < nt; t++) acc[t] = splat(0.f);
                for (int64_t p = first; p < end; p++) {
                    const float* w = s->w + p * bb + a * bc;
                    const float* x = x0 + s->col[p] * bc;
                    for (int64_t v = 0; v < nv; v++) {
                        const vec wv = load(w + VW * v);
                        for (int64_t t = 0; t < nt; t++) acc[t] += wv * load(x + t * s->in + VW * v);
                    }
                }
                const float b = s->bias ? s->bias[r * br + a] : 0.f;
                for (int64_t t = 0; t < nt; t++) y0[t * s->outf + a] = hsum(acc[t]) + b;
            }
        }
    }
}

/* The same product with x (tokens x in) in its own layout, reading each block once per DOT_TOKENS tokens. */
void bsr_forward_dot(const float* x, const float* w, const int64_t* crow, const int64_t* col, const float* bias,
                     float* y, int64_t tokens, int64_t in, int64_t n_rows, int64_t br, int64_t bc, int threads) {
    args_t s = {0};
    s.x = x, s.w = w, s.bias = bias, s.out = y, s.crow = crow, s.col = col;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.n_rows = n_rows, s.br = br, s.bc = bc;
    parallel_run(forward_dot_items, &s, n_rows, 1, threads);
}

/* ---- input gradient: item = (token tile, block-column c), token-major. dX[:, c] = sum over the column's blocks of
   dY[:, r] W_rc, W_rc (br x bc) read in its stored layout, dY block-major, gy_bm (n_rows, tokens, br). order: the
   blocks by column (stable), cstart: n_cols + 1, row_of: each block's block-row. */
static void grad_input_items(const void* ctx, int64_t i0, int64_t i1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    float* sum = (float*)alloc_floats(SUB_TOKENS * bc);
    for (int64_t i = i0; i < i1; i++) {
        const int64_t c = i % s->n_cols, t0 = (i / s->n_cols) * TILE_TOKENS, t1 = min64(t0 + TILE_TOKENS, s->tokens);
        const int64_t first = s->cstart[c], last = s->cstart[c + 1] - 1;
        for (int64_t u = t0; u < t1; u += SUB_TOKENS) {
            const int64_t rows = min64(t1 - u, SUB_TOKENS);
            float* dx = s->out + u * s->in + c * bc;
            if (last < first) fill(rows, bc, NULL, dx, s->in);
            for (int64_t q = first; q <= last; q++) {
                const int64_t j = s->order[q];
                product(rows, bc, s->gy + (s->row_of[j] * s->tokens + u) * br, br, 1, s->w + j * bb, bc, br,
                        q > first ? sum : NULL, bc, q < last ? sum : dx, q < last ? bc : s->in);
            }
        }
    }
    free(sum);
}

/* dx (tokens x in) = gy W. gy: (tokens, n_rows*br). Scratch: gy_bm, tokens * n_rows*br floats. */
void bsr_grad_input(const float* gy, const float* w, const int64_t* order, const int64_t* cstart, const int64_t* row_of,
                    float* dx, float* gy_bm, int64_t tokens, int64_t in, int64_t n_rows, int64_t br, int64_t bc,
                    int threads) {
    advise_huge_pages(dx, sizeof(float) * (size_t)(tokens * in));
    block_major(gy, gy_bm, tokens, n_rows * br, br, threads);
    args_t s = {0};
    s.gy = gy_bm, s.w = w, s.out = dx, s.order = order, s.cstart = cstart, s.row_of = row_of;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.n_cols = in / bc, s.br = br, s.bc = bc;
    s.token_tiles = (tokens + TILE_TOKENS - 1) / TILE_TOKENS;
    parallel_run(grad_input_items, &s, s.n_cols * s.token_tiles, 1, threads);
}

/* ---- block gradients: item = active block j (row r, column c); dW_j = dY[:, r]^T X[:, c] (br x bc), from gy_bm
   and x_bm (block-major), summed over the tokens GRAD_CHUNK at a time (A[m, k] = dY[t0 + k, r * br + m]: rows 1
   apart, tokens br apart). */
static void grad_blocks_items(const void* ctx, int64_t j0, int64_t j1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    for (int64_t j = j0; j < j1; j++) {
        const float* gy = s->gy + s->row_of[j] * s->tokens * br;
        const float* x = s->x + s->col[j] * s->tokens * bc;
        float* dw = s->out + j * bb;
        if (s->tokens == 0) memset(dw, 0, sizeof(float) * (size_t)bb);
        for (int64_t t0 = 0; t0 < s->tokens; t0 += GRAD_CHUNK)
            product(br, bc, gy + t0 * br, 1, br, x + t0 * bc, bc, min64(s->tokens - t0, GRAD_CHUNK), t0 ? dw : NULL,
                    bc, dw, bc);
    }
}

/* dw (n_active, br, bc) = the active blocks of gy^T x. Scratch: gy_bm (tokens * n_rows*br floats), x_bm (tokens * in). */
void bsr_grad_blocks(const float* gy, const float* x, const int64_t* col, const int64_t* row_of, float* dw,
                     float* gy_bm, float* x_bm, int64_t n_active, int64_t tokens, int64_t in, int64_t n_rows,
                     int64_t br, int64_t bc, int threads) {
    block_major(gy, gy_bm, tokens, n_rows * br, br, threads);
    block_major(x, x_bm, tokens, in, bc, threads);
    args_t s = {0};
    s.gy = gy_bm, s.x = x_bm, s.out = dw, s.col = col, s.row_of = row_of;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.br = br, s.bc = bc;
    parallel_run(grad_blocks_items, &s, n_active, 1, threads);
}

/* ---- both gradients in one pass: item = block-column c, all tokens (columns: the block-columns, most blocks
   first, so the last items are the short ones). For each BACKWARD_TOKENS tokens and each block j of the column
   (block-row r), one slice of dY[:, r] (block-major, in L1) is the A operand of both products: dX[:, c] += dY[:, r]
   W_j, summed over the column's blocks as in bsr_grad_input, and dW_j += dY[:, r]^T X[:, c], summed over the tokens
   in order as in bsr_grad_blocks, so both results are bit for bit those of the two separate passes. dY and X are
   copied block-major once instead of twice and dY is read once instead of twice: the backward of GPT-3 Small SW-75
   MLP-in took 18-23% less time than the two passes (AMD EPYC, 1 and 2 threads, 2026-12-03). An item owns its
   column's dX and dW, so there are only as many items as block-columns: the Python side uses this pass only when
   there are enough of them for the threads (block_sparse_cpu.py: FUSED_BACKWARD_COLUMNS_PER_THREAD). */
static void backward_items(const void* ctx, int64_t i0, int64_t i1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc, tokens = s->tokens;
    float* sum = (float*)alloc_floats(BACKWARD_TOKENS * bc);
    for (int64_t i = i0; i < i1; i++) {
        const int64_t c = s->columns[i], first = s->cstart[c], last = s->cstart[c + 1] - 1;
        const float* x = s->x + c * tokens * bc;
        for (int64_t t0 = 0; t0 < tokens; t0 += BACKWARD_TOKENS) {
            const int64_t rows = min64(tokens - t0, BACKWARD_TOKENS);
            float* dx = s->out + t0 * s->in + c * bc;
            if (last < first) fill(rows, bc, NULL, dx, s->in);
            for (int64_t q = first; q <= last; q++) {
                const int64_t j = s->order[q];
                const float* gy = s->gy + (s->row_of[j] * tokens + t0) * br;
                float* dw = s->grad_blocks + j * bb;
                product(rows, bc, gy, br, 1, s->w + j * bb, bc, br, q > first ? sum : NULL, bc, q < last ? sum : dx,
                        q < last ? bc : s->in);
                product(br, bc, gy, 1, br, x + t0 * bc, bc, rows, t0 ? dw : NULL, bc, dw, bc);
            }
        }
    }
    free(sum);
}

/* dx (tokens x in) = gy W and dw (n_active, br, bc) = the active blocks of gy^T x, with the arguments of
   bsr_grad_input and bsr_grad_blocks (columns: the n_cols block-columns in the order they are taken). The blocks of
   an empty column have no gradient to write; its dx is zero. */
void bsr_backward(const float* gy, const float* x, const float* w, const int64_t* order, const int64_t* cstart,
                  const int64_t* row_of, const int64_t* columns, float* dx, float* dw, float* gy_bm, float* x_bm,
                  int64_t n_active, int64_t tokens, int64_t in, int64_t n_rows, int64_t br, int64_t bc, int threads) {
    advise_huge_pages(dx, sizeof(float) * (size_t)(tokens * in));
    block_major(gy, gy_bm, tokens, n_rows * br, br, threads);
    block_major(x, x_bm, tokens, in, bc, threads);
    args_t s = {0};
    s.gy = gy_bm, s.x = x_bm, s.w = w, s.out = dx, s.grad_blocks = dw;
    s.order = order, s.cstart = cstart, s.row_of = row_of, s.columns = columns;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.n_cols = in / bc, s.br = br, s.bc = bc;
    if (tokens == 0) memset(dw, 0, sizeof(float) * (size_t)(n_active * br * bc));
    parallel_run(backward_items, &s, s.n_cols, 1, threads);
}

/* The interface version the Python side checks before using a library (block_sparse_cpu.py: KERNEL_ABI). */
int block_sparse_kernel_abi(void) { return 3; }
