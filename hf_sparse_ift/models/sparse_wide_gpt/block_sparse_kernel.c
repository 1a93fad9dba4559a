/* The native CPU kernel of block-sparse linears (block_sparse_cpu.py), fp32: the forward, the input gradient and the
   block gradients of y = x W^T + b for a weight stored as its active (BR x BC) blocks in BSR order. Built ahead of
   time by `hf-sparse-ift build-kernels`, never while a model loads; without a built library the same products run
   through torch (block_sparse_cpu.py), with equal results up to the order of the fp32 sums.

   Every product is a sum of small dense products, computed by one register-tiled micro-kernel: a tile of MR rows x
   up to 64 columns of the result stays in vector registers while it accumulates over all the blocks it sums (a
   whole block-row of the forward, a whole block-column of the input gradient, all tokens of a block gradient), so
   the result is written once and no partial product goes through memory. Columns come in vectors of 16 floats
   (GCC vector extensions: one AVX-512 register, two AVX2 ones), so BR and BC must be multiples of 16.

   With up to DOT_TOKENS tokens (decoding) the forward reads each block once, in its stored layout, and takes one
   dot product per output per token: decoding is memory-bound and this reads no byte twice.

   Work is shared through the pool of kernel_pool.h (this library's own threads; no torch setting is touched). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_pool.h"

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#if defined(__AVX512F__)
#define MR 6 /* 6 x 4 accumulators + 4 loaded vectors + 1 broadcast fit the 32 AVX-512 registers */
#else
#define MR 2 /* a v16 is two AVX2 registers: 2 x 4 x 2 accumulators fill the 16 (not tuned: measured on AVX-512) */
#endif
#define DOT_TOKENS 4

static inline v16 load16(const float* p) { return *(const v16u*)p; }
static inline void store16(float* p, v16 v) { *(v16u*)p = v; }
/* a broadcast (vbroadcastss from memory); `(v16){0} + v` would add 0.0 first, a port-5 instruction per use */
static inline v16 splat(float v) { return (v16){v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v}; }

/* C[m, n] (m < mr, n < 16 * nv) = init + sum_p sum_k A_p[m, k] * B_p[k, n], for p < np, k < K, where
   A_p[m, k] = a[a_off[p] + m * a_m + k * a_k] and B_p[k, n] = b_p[p][k * ldb + n]. init: 0 (none), a row vector
   broadcast over the rows (bias), or C itself (accumulate). MR_ and NV are constants after inlining, so the
   accumulators stay in registers. */
enum { INIT_ZERO, INIT_ROW, INIT_C };

static inline __attribute__((always_inline)) void tile(
    const int mr, const int nv, const float* a, const int64_t* a_off, int64_t a_m, int64_t a_k,
    const float* const* b_p, int64_t ldb, int64_t np, int64_t K, int init, const float* row, float* c, int64_t ldc) {
    v16 acc[6][4]; /* mr <= 6 */
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++)
            acc[m][v] = init == INIT_ROW ? load16(row + 16 * v) : init == INIT_C ? load16(c + m * ldc + 16 * v)
                                                                                 : splat(0.f);
    for (int64_t p = 0; p < np; p++) {
        const float* ap = a + a_off[p];
        const float* bp = b_p[p];
        for (int64_t k = 0; k < K; k++) {
            v16 bv[4];
            for (int v = 0; v < nv; v++) bv[v] = load16(bp + k * ldb + 16 * v);
            for (int m = 0; m < mr; m++) {
                const v16 av = splat(ap[m * a_m + k * a_k]);
                for (int v = 0; v < nv; v++) acc[m][v] += av * bv[v];
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < nv; v++) store16(c + m * ldc + 16 * v, acc[m][v]);
}

#define TILE_CASES(MR_)                                                                                        \
    switch (nv) {                                                                                              \
        case 1: tile(MR_, 1, a, a_off, a_m, a_k, b_p, ldb, np, K, init, row, c, ldc); break;                   \
        case 2: tile(MR_, 2, a, a_off, a_m, a_k, b_p, ldb, np, K, init, row, c, ldc); break;                   \
        case 3: tile(MR_, 3, a, a_off, a_m, a_k, b_p, ldb, np, K, init, row, c, ldc); break;                   \
        default: tile(MR_, 4, a, a_off, a_m, a_k, b_p, ldb, np, K, init, row, c, ldc); break;                  \
    }

static void tile_full(int nv, const float* a, const int64_t* a_off, int64_t a_m, int64_t a_k, const float* const* b_p,
                      int64_t ldb, int64_t np, int64_t K, int init, const float* row, float* c, int64_t ldc) {
    TILE_CASES(MR)
}

static void tile_four(int nv, const float* a, const int64_t* a_off, int64_t a_m, int64_t a_k, const float* const* b_p,
                      int64_t ldb, int64_t np, int64_t K, int init, const float* row, float* c, int64_t ldc) {
    TILE_CASES(4)
}

static void tile_one(int nv, const float* a, const int64_t* a_off, int64_t a_m, int64_t a_k, const float* const* b_p,
                     int64_t ldb, int64_t np, int64_t K, int init, const float* row, float* c, int64_t ldc) {
    TILE_CASES(1)
}

/* C (rows x n) = init + sum_p A_p B_p over all rows, in MR-row tiles (then 4 and 1 for the rest) and 64-column
   panels. a_m: A's stride between result rows; c's rows are ldc apart. For init == INIT_ROW, row has n entries.
   shifted: room for np pointers. */
static void product(int64_t rows, int64_t n, const float* a, const int64_t* a_off, int64_t a_m, int64_t a_k,
                    const float* const* b_p, int64_t ldb, int64_t np, int64_t K, int init, const float* row,
                    float* c, int64_t ldc, const float** shifted) {
    for (int64_t n0 = 0; n0 < n; n0 += 64) {
        const int nv = (int)((n - n0 < 64 ? n - n0 : 64) / 16);
        for (int64_t p = 0; p < np; p++) shifted[p] = b_p[p] + n0;
        const float* row0 = row ? row + n0 : NULL;
        int64_t m = 0;
        for (; m + MR <= rows; m += MR)
            tile_full(nv, a + m * a_m, a_off, a_m, a_k, shifted, ldb, np, K, init, row0, c + m * ldc + n0, ldc);
        for (; MR > 4 && m + 4 <= rows; m += 4)
            tile_four(nv, a + m * a_m, a_off, a_m, a_k, shifted, ldb, np, K, init, row0, c + m * ldc + n0, ldc);
        for (; m < rows; m++)
            tile_one(nv, a + m * a_m, a_off, a_m, a_k, shifted, ldb, np, K, init, row0, c + m * ldc + n0, ldc);
    }
}

typedef struct {
    const float *x, *w, *bias, *gy;
    float* out;
    const int64_t *crow, *col, *order, *cstart, *row_of;
    int64_t tokens, in, outf, n_rows, n_cols, br, bc, token_tiles, tile_tokens;
} args_t;

/* ---- forward: item = (block-row r, token tile). The input comes block-major, x_bm (in / bc, tokens, bc), so that a
   tile's rows are contiguous; the row's blocks are transposed into a buffer once per item (bc x br each) so that a
   result row's columns are contiguous in B. */
static void forward_items(const void* ctx, int64_t i0, int64_t i1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t r = i / s->token_tiles, t0 = (i % s->token_tiles) * s->tile_tokens;
        const int64_t t1 = t0 + s->tile_tokens < s->tokens ? t0 + s->tile_tokens : s->tokens;
        const int64_t first = s->crow[r], np = s->crow[r + 1] - first;
        /* 64-byte aligned: a row of B that straddles two cache lines costs two loads per vector */
        float* wt = (float*)aligned_alloc(64, (sizeof(float) * (size_t)(np * bb) + 64) / 64 * 64);
        int64_t* a_off = (int64_t*)malloc(sizeof(int64_t) * (size_t)np + 1);
        const float** b_p = (const float**)malloc(sizeof(float*) * (size_t)(2 * np) + 1);
        for (int64_t p = 0; p < np; p++) {
            const float* w = s->w + (first + p) * bb;
            float* t = wt + p * bb;
            for (int64_t a = 0; a < br; a++)
                for (int64_t b = 0; b < bc; b++) t[b * br + a] = w[a * bc + b];
            a_off[p] = s->col[first + p] * s->tokens * bc;
            b_p[p] = t;
        }
        product(t1 - t0, br, s->x + t0 * bc, a_off, bc, 1, b_p, br, np, bc, s->bias ? INIT_ROW : INIT_ZERO,
                s->bias ? s->bias + r * br : NULL, s->out + t0 * s->outf + r * br, s->outf, b_p + np);
        free(wt);
        free(a_off);
        free(b_p);
    }
}

/* ---- forward with few tokens: item = block-row; each block is read once in its stored layout (BR x BC), and
   every output is one dot product per token over the row's blocks. */
static inline float hsum16(v16 v) {
    float s = 0.f;
    for (int k = 0; k < 16; k++) s += v[k];
    return s;
}

static void forward_dot_items(const void* ctx, int64_t r0, int64_t r1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc, nv = bc / 16;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t first = s->crow[r], end = s->crow[r + 1];
        for (int64_t t0 = 0; t0 < s->tokens; t0 += DOT_TOKENS) {
            const int64_t nt = s->tokens - t0 < DOT_TOKENS ? s->tokens - t0 : DOT_TOKENS;
            const float* x0 = s->x + t0 * s->in;
            float* y0 = s->out + t0 * s->outf + r * br;
            for (int64_t a = 0; a < br; a++) {
                v16 acc[DOT_TOKENS];
                for (int64_t t = 0; t < nt; t++) acc[t] = splat(0.f);
                for (int64_t p = first; p < end; p++) {
                    const float* w = s->w + p * bb + a * bc;
                    const float* x = x0 + s->col[p] * bc;
                    for (int64_t v = 0; v < nv; v++) {
                        const v16 wv = load16(w + 16 * v);
                        for (int64_t t = 0; t < nt; t++) acc[t] += wv * load16(x + t * s->in + 16 * v);
                    }
                }
                const float b = s->bias ? s->bias[r * br + a] : 0.f;
                for (int64_t t = 0; t < nt; t++) y0[t * s->outf + a] = hsum16(acc[t]) + b;
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

/* y (tokens x n_rows*br) = x W^T + bias, x given block-major: x_bm (in / bc, tokens, bc). w: (n_active, br, bc);
   crow: n_rows + 1; col: n_active. */
void bsr_forward(const float* x_bm, const float* w, const int64_t* crow, const int64_t* col, const float* bias,
                 float* y, int64_t tokens, int64_t in, int64_t n_rows, int64_t br, int64_t bc, int threads) {
    args_t s = {0};
    s.x = x_bm, s.w = w, s.bias = bias, s.out = y, s.crow = crow, s.col = col;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.n_rows = n_rows, s.br = br, s.bc = bc;
    s.tile_tokens = 16 * MR * 4; /* a tile's result rows times up to 64 columns stay within L2 */
    s.token_tiles = (tokens + s.tile_tokens - 1) / s.tile_tokens;
    parallel_run(forward_items, &s, n_rows * s.token_tiles, 1, threads);
}

/* ---- input gradient: item = (block-column c, token tile); dX[:, c] = sum over the column's blocks dY[:, r] W_rc,
   with W_rc (br x bc) read in its stored layout and dY given block-major, gy_bm (n_rows, tokens, br). order: the blocks by column (stable), cstart: n_cols + 1,
   row_of: each block's block-row. */
static void grad_input_items(const void* ctx, int64_t i0, int64_t i1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t c = i / s->token_tiles, t0 = (i % s->token_tiles) * s->tile_tokens;
        const int64_t t1 = t0 + s->tile_tokens < s->tokens ? t0 + s->tile_tokens : s->tokens;
        const int64_t first = s->cstart[c], np = s->cstart[c + 1] - first;
        float* dst = s->out + t0 * s->in + c * bc;
        if (np == 0) {
            for (int64_t t = t0; t < t1; t++) memset(dst + (t - t0) * s->in, 0, sizeof(float) * (size_t)bc);
            continue;
        }
        int64_t* a_off = (int64_t*)malloc(sizeof(int64_t) * (size_t)np);
        const float** b_p = (const float**)malloc(sizeof(float*) * (size_t)(2 * np));
        for (int64_t p = 0; p < np; p++) {
            const int64_t j = s->order[first + p];
            a_off[p] = s->row_of[j] * s->tokens * br;
            b_p[p] = s->w + j * bb;
        }
        product(t1 - t0, bc, s->gy + t0 * br, a_off, br, 1, b_p, bc, np, br, INIT_ZERO, NULL, dst, s->in, b_p + np);
        free(a_off);
        free(b_p);
    }
}

void bsr_grad_input(const float* gy_bm, const float* w, const int64_t* order, const int64_t* cstart,
                    const int64_t* row_of, float* dx, int64_t tokens, int64_t in, int64_t n_rows, int64_t br,
                    int64_t bc, int threads) {
    args_t s = {0};
    s.gy = gy_bm, s.w = w, s.out = dx, s.order = order, s.cstart = cstart, s.row_of = row_of;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.n_cols = in / bc, s.br = br, s.bc = bc;
    s.tile_tokens = 16 * MR * 4;
    s.token_tiles = (tokens + s.tile_tokens - 1) / s.tile_tokens;
    parallel_run(grad_input_items, &s, s.n_cols * s.token_tiles, 1, threads);
}

/* ---- block gradients: item = active block j (row r, column c); dW_j = dY[:, r]^T X[:, c] (br x bc), from gy_bm
   and x_bm (block-major), summed over the tokens in chunks that stay in L1 (the result is reloaded once a chunk). */
#define GRAD_CHUNK 64
static void grad_blocks_items(const void* ctx, int64_t j0, int64_t j1) {
    const args_t* s = (const args_t*)ctx;
    const int64_t br = s->br, bc = s->bc, bb = br * bc;
    const int64_t zero = 0;
    for (int64_t j = j0; j < j1; j++) {
        const int64_t r = s->row_of[j], c = s->col[j];
        float* dw = s->out + j * bb;
        if (s->tokens == 0) memset(dw, 0, sizeof(float) * (size_t)bb);
        for (int64_t t0 = 0; t0 < s->tokens; t0 += GRAD_CHUNK) {
            const int64_t k = s->tokens - t0 < GRAD_CHUNK ? s->tokens - t0 : GRAD_CHUNK;
            const float* b = s->x + (c * s->tokens + t0) * bc;
            const float* shifted[1];
            /* A[m, k] = dY[t0 + k, r * br + m]: rows 1 apart, tokens br apart in gy_bm */
            product(br, bc, s->gy + (r * s->tokens + t0) * br, &zero, 1, br, &b, bc, 1, k,
                    t0 == 0 ? INIT_ZERO : INIT_C, NULL, dw, bc, shifted);
        }
    }
}

void bsr_grad_blocks(const float* gy_bm, const float* x_bm, const int64_t* col, const int64_t* row_of, float* dw,
                     int64_t n_active, int64_t tokens, int64_t in, int64_t n_rows, int64_t br, int64_t bc,
                     int threads) {
    args_t s = {0};
    s.gy = gy_bm, s.x = x_bm, s.out = dw, s.col = col, s.row_of = row_of;
    s.tokens = tokens, s.in = in, s.outf = n_rows * br, s.br = br, s.bc = bc;
    parallel_run(grad_blocks_items, &s, n_active, 1, threads);
}

/* The interface version the Python side checks before using a library (block_sparse_cpu.py: KERNEL_ABI). */
int block_sparse_kernel_abi(void) { return 1; }
