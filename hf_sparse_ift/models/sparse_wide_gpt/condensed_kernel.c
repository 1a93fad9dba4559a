/* The CPU kernel of condensed sparse linears (condensed_linear.py): y[t, row] = bias + sum_p value[p] * x[t, col[p]] over the
   stored rows, accumulating in fp32 (bf16 values are widened exactly). Built ahead of time by
   `hf-sparse-ift build-kernels` (condensed_kernel.py), never while a model loads; without a built library the layer
   computes the same sums with torch.

   Batch 1 uses one dot product per row (fp32 values on AVX-512: the row's inputs as a bit mask, `gemv_mask_f32`);
   more tokens use tiles of 16 or 64 tokens so that each stored weight is read once per tile. Work is shared as
   kernel_pool.h says. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float from_f32(float v) { return v; }
static inline float from_bf16(uint16_t v) { uint32_t u = ((uint32_t)v) << 16; float f; memcpy(&f, &u, 4); return f; }

#include "kernel_pool.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

/* One token, fp32 values, each row's inputs given by a bit mask (rows x words uint64, bit c of a row: input c is
   active) instead of an index per weight: 1 bit per input read instead of 16 per active weight, which at 75%
   sparsity is 4.5 instead of 6 bytes per active weight. The row's values are its active inputs' in input order, from
   starts[r]. For 16 inputs at a time an expanding load places the next popcount(bits) values in the active lanes and
   one FMA multiplies them with the 16 inputs (masked loads: inactive inputs are not read, so the last word may reach
   past the input). Batch-1 decoding is memory-bound: this path read the sparse layers of SW-75 GPT-3 Small 1.34x
   faster than the int16 one (one thread, 2026-12-03, Intel Xeon with AVX-512). AVX-512 only (`gemv_mask_native`
   says whether this build has it; the fallback is the same sums, one input at a time). */
typedef struct {
    const float *x, *val;
    const uint64_t* mask;
    const int64_t *starts, *row_ids;
    const float* bias;
    float* y;
    int64_t words;
} mask_args_t;

static void gemv_mask_rows(const void* ctx, int64_t r0, int64_t r1) {
    const mask_args_t* a = (const mask_args_t*)ctx;
    for (int64_t r = r0; r < r1; r++) {
        const float* v = a->val + a->starts[r];
        const uint64_t* bits = a->mask + r * a->words;
#if defined(__AVX512F__)
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t w = 0; w < a->words; w++) {
            const uint64_t word = bits[w];
            const float* xw = a->x + 64 * w;
            for (int q = 0; q < 4; q += 2) {
                const __mmask16 m0 = (__mmask16)(word >> (16 * q)), m1 = (__mmask16)(word >> (16 * q + 16));
                acc0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m0, v), _mm512_maskz_loadu_ps(m0, xw + 16 * q), acc0);
                v += __builtin_popcount(m0);
                acc1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(m1, v), _mm512_maskz_loadu_ps(m1, xw + 16 * q + 16),
                                       acc1);
                v += __builtin_popcount(m1);
            }
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
        float s = 0.f;
        for (int64_t w = 0; w < a->words; w++)
            for (uint64_t word = bits[w]; word; word &= word - 1) s += *v++ * a->x[64 * w + __builtin_ctzll(word)];
#endif
        const int64_t o = a->row_ids[r];
        a->y[o] = s + (a->bias ? a->bias[o] : 0.f);
    }
}

void gemv_mask_f32(const float* x, const float* val, const uint64_t* mask, const int64_t* starts, const int64_t* row_ids,
                   const float* bias, float* y, int64_t rows, int64_t words, int threads) {
    const mask_args_t a = {x, val, mask, starts, row_ids, bias, y, words};
    parallel_run(gemv_mask_rows, &a, rows, 32, threads);
}

int gemv_mask_native(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* The interface version the Python side checks before using a library (condensed_kernel.py: KERNEL_ABI). */
int condensed_kernel_abi(void) { return 2; }
