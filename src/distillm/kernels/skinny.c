/* A float32 linear map for a few input rows (a decoding step), built and loaded by distillm/kernels/skinny.py.
 *
 * out[r, o] = bias[o] + sum_i x[r, i] * w[o, i]      x [rows, in], w [out, in], out [rows, out], row-major
 *
 * A decoding step multiplies a handful of rows by every weight matrix of the model, so it is bound by reading
 * the weights: each weight row is read once from memory (prefetched ahead of use) and multiplied into every
 * input row while it sits in the L1 cache, 8 input rows at a time. The weight rows are split evenly among
 * OpenMP threads, each thread taking one contiguous range of them; several maps of the same input (a layer's
 * query, key and value maps) can be run in one call, their rows split together.
 *
 * Every output is summed the same way: 8 interleaved partial sums over the input (lane j adds, by fused
 * multiply-adds in order, the products at i = j, j + 8, j + 16, ...), then their sum, then the scalar tail,
 * then the bias. So a row's result does not depend on the batch it is computed in, and both code paths give
 * the same bits:
 * - AVX2: one 8-lane accumulator per input row.
 * - AVX-512 (where the CPU has it): two input rows per 16-lane register (row r in the low 8 lanes, row r + 1
 *   in the high 8) against the weights' 8 floats broadcast to both halves, and two weight rows at a time;
 *   each half runs exactly the AVX2 lanes' chain, with half the instructions.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 8           /* input rows per pass over a weight row */
#define PREFETCH 2048    /* floats ahead of the current weight position (8 KiB) */
#define BLOCK 64         /* weight rows a thread takes through all input tiles before the next ones */

__attribute__((target("avx2,fma"))) static inline float lane_sum(__m256 a) {
    __m128 low = _mm256_castps256_ps128(a), high = _mm256_extractf128_ps(a, 1);
    low = _mm_add_ps(low, high);
    low = _mm_add_ps(low, _mm_movehl_ps(low, low));
    low = _mm_add_ss(low, _mm_shuffle_ps(low, low, 1));
    return _mm_cvtss_f32(low);
}

/* The products past the last multiple of 8 inputs, added one by one (one function, so that both paths compile
 * them alike). */
__attribute__((target("avx2,fma"), noinline)) static float tail(float total, const float *x, const float *w,
                                                               int64_t from, int64_t in) {
    for (int64_t i = from; i < in; i++) total += x[i] * w[i];
    return total;
}

/* ---- AVX2 ---- */

/* One weight row w [in] against n (<= TILE, a constant after inlining) input rows; writes out[r * ldo]. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
weight_row(const float *x, int64_t in, const float *w, float bias, float *out, int64_t ldo, const int n) {
    __m256 acc[TILE];
    for (int r = 0; r < n; r++) acc[r] = _mm256_setzero_ps();
    const int64_t vectorised = in & ~(int64_t)7;
    for (int64_t i = 0; i < vectorised; i += 8) {
        _mm_prefetch((const char *)(w + i + PREFETCH), _MM_HINT_T0);
        const __m256 weight = _mm256_loadu_ps(w + i);
        for (int r = 0; r < n; r++) acc[r] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(x + r * in + i), acc[r]);
    }
    for (int r = 0; r < n; r++) {
        float total = lane_sum(acc[r]);
        if (vectorised < in) total = tail(total, x + r * in, w, vectorised, in);
        out[r * ldo] = total + bias;
    }
}

/* A tile of n input rows against weight rows [first, last). */
__attribute__((target("avx2,fma"))) static void tile(const float *x, int64_t in, const float *w, const float *bias,
                                                      float *out, int64_t ldo, int64_t first, int64_t last, int n) {
#define ROWS(N)                                                                                        \
    for (int64_t o = first; o < last; o++)                                                             \
        weight_row(x, in, w + o * in, bias ? bias[o] : 0.0f, out + o, ldo, N);                         \
    break;
    switch (n) {
    case 1: ROWS(1)
    case 2: ROWS(2)
    case 3: ROWS(3)
    case 4: ROWS(4)
    case 5: ROWS(5)
    case 6: ROWS(6)
    case 7: ROWS(7)
    default: ROWS(8)
    }
#undef ROWS
}

/* ---- AVX-512 ---- */

/* The vectorised part of n (<= TILE) input rows rearranged for the AVX-512 path: for each pair of rows and
 * each 8 inputs, 16 floats (the first row's 8, then the second's; zeros where n is odd). */
static void pair_rows(const float *x, int64_t in, int n, float *pairs) {
    const int64_t chunks = in / 8;
    for (int p = 0; p < (n + 1) / 2; p++)
        for (int64_t c = 0; c < chunks; c++) {
            float *to = pairs + (p * chunks + c) * 16;
            memcpy(to, x + (2 * p) * in + c * 8, 8 * sizeof(float));
            if (2 * p + 1 < n)
                memcpy(to + 8, x + (2 * p + 1) * in + c * 8, 8 * sizeof(float));
            else
                memset(to + 8, 0, 8 * sizeof(float));
        }
}

__attribute__((target("avx512f,avx2,fma"), always_inline)) static inline __m512 broadcast8(const float *w) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(w))));
}

/* The 16 lanes of acc as the two rows' outputs (rows 2p and 2p + 1 of x, the second only where it exists). */
__attribute__((target("avx512f,avx2,fma"), always_inline)) static inline void
finish(__m512 acc, const float *x, int64_t in, const float *w, float bias, float *out, int64_t ldo, int p, int n) {
    const int64_t vectorised = in & ~(int64_t)7;
    for (int h = 0; h < 2 && 2 * p + h < n; h++) {
        const __m256 half = h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))
                              : _mm512_castps512_ps256(acc);
        const int r = 2 * p + h;
        float total = lane_sum(half);
        if (vectorised < in) total = tail(total, x + r * in, w, vectorised, in);
        out[r * ldo] = total + bias;
    }
}

/* Weight rows o (and o + 1 where two, a constant after inlining) against P = (n + 1) / 2 pairs of rows. */
__attribute__((target("avx512f,avx2,fma"), always_inline)) static inline void
weight_rows512(const float *x, const float *pairs, int64_t in, const float *w, const float *bias, int64_t o,
               float *out, int64_t ldo, const int n, const int two) {
    const int P = (n + 1) / 2;
    const int64_t chunks = in / 8;
    const float *w0 = w + o * in, *w1 = w0 + in;
    __m512 acc0[TILE / 2], acc1[TILE / 2];
    for (int p = 0; p < P; p++) acc0[p] = acc1[p] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        _mm_prefetch((const char *)(w0 + c * 8 + PREFETCH), _MM_HINT_T0);
        const __m512 a = broadcast8(w0 + c * 8);
        if (two) {
            _mm_prefetch((const char *)(w1 + c * 8 + PREFETCH), _MM_HINT_T0);
            const __m512 b = broadcast8(w1 + c * 8);
            for (int p = 0; p < P; p++) {
                const __m512 v = _mm512_load_ps(pairs + (p * chunks + c) * 16);
                acc0[p] = _mm512_fmadd_ps(a, v, acc0[p]);
                acc1[p] = _mm512_fmadd_ps(b, v, acc1[p]);
            }
        } else {
            for (int p = 0; p < P; p++) acc0[p] = _mm512_fmadd_ps(a, _mm512_load_ps(pairs + (p * chunks + c) * 16), acc0[p]);
        }
    }
    for (int p = 0; p < P; p++) finish(acc0[p], x, in, w0, bias ? bias[o] : 0.0f, out + o, ldo, p, n);
    if (two)
        for (int p = 0; p < P; p++) finish(acc1[p], x, in, w1, bias ? bias[o + 1] : 0.0f, out + o + 1, ldo, p, n);
}

__attribute__((target("avx512f,avx2,fma"))) static void tile512(const float *x, const float *pairs, int64_t in,
                                                                 const float *w, const float *bias, float *out,
                                                                 int64_t ldo, int64_t first, int64_t last, int n) {
#define ROWS(N)                                                                                        \
    {                                                                                                  \
        int64_t o = first;                                                                             \
        for (; o + 1 < last; o += 2) weight_rows512(x, pairs, in, w, bias, o, out, ldo, N, 1);         \
        if (o < last) weight_rows512(x, pairs, in, w, bias, o, out, ldo, N, 0);                        \
    }                                                                                                  \
    break;
    switch (n) {
    case 1: ROWS(1)
    case 2: ROWS(2)
    case 3: ROWS(3)
    case 4: ROWS(4)
    case 5: ROWS(5)
    case 6: ROWS(6)
    case 7: ROWS(7)
    default: ROWS(8)
    }
#undef ROWS
}

/* ---- entry points ---- */

/* 1 where this CPU runs the kernel (AVX2 and FMA), else 0: the caller must not call distillm_skinny_linear. */
int distillm_skinny_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* 1 where distillm_skinny_linear takes the AVX-512 path (AVX-512F), else 0. */
int distillm_skinny_wide(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* Several linear maps of the same input rows x [rows, in] in one call: map m has weight w[m] [outs[m], in],
 * bias[m] (or NULL) and writes out[m] [rows, outs[m]]. Their weight rows, taken together, are split evenly
 * among the threads. wide: 1 takes the AVX-512 path (only where distillm_skinny_wide() is 1), 0 the AVX2
 * path; the bits are the same. Returns 0, or -1 where the AVX-512 path's buffer could not be had (nothing
 * written). */
int distillm_skinny_maps(const float *x, int64_t rows, int64_t in, int maps, const float *const *w,
                         const int64_t *outs, const float *const *bias, float *const *out, int threads, int wide) {
    const int64_t tiles = (rows + TILE - 1) / TILE, chunks = in / 8;
    float *pairs = NULL;
    if (wide) {
        /* every tile's rows, paired: tiles x (TILE / 2) pairs x chunks x 16 floats, 64-byte aligned */
        const size_t bytes = ((size_t)(tiles * (TILE / 2) * chunks * 16 * sizeof(float)) + 63) & ~(size_t)63;
        pairs = aligned_alloc(64, bytes ? bytes : 64);
        if (!pairs) return -1;
        for (int64_t t = 0; t < tiles; t++) {
            const int n = rows - t * TILE < TILE ? (int)(rows - t * TILE) : TILE;
            pair_rows(x + t * TILE * in, in, n, pairs + t * (TILE / 2) * chunks * 16);
        }
    }
    int64_t total = 0;
    for (int m = 0; m < maps; m++) total += outs[m];
#pragma omp parallel num_threads(threads)
    {
        /* thread k of T takes weight rows [k * total / T, (k + 1) * total / T) of the maps laid end to end */
        const int64_t k = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t first = k * total / count, last = (k + 1) * total / count;
        int64_t base = 0;
        for (int m = 0; m < maps; base += outs[m], m++) {
            const int64_t from = first > base ? first - base : 0;
            const int64_t to = last - base < outs[m] ? last - base : outs[m];
            for (int64_t b = from; b < to; b += BLOCK) {
                const int64_t end = b + BLOCK < to ? b + BLOCK : to;
                for (int64_t t = 0; t < tiles; t++) {
                    const int n = rows - t * TILE < TILE ? (int)(rows - t * TILE) : TILE;
                    float *o = out[m] + t * TILE * outs[m];
                    if (wide)
                        tile512(x + t * TILE * in, pairs + t * (TILE / 2) * chunks * 16, in, w[m], bias[m], o,
                                outs[m], b, end, n);
                    else
                        tile(x + t * TILE * in, in, w[m], bias[m], o, outs[m], b, end, n);
                }
            }
        }
    }
    free(pairs);
    return 0;
}

/* One map: distillm_skinny_maps with maps = 1. */
int distillm_skinny_linear(const float *x, int64_t rows, int64_t in, const float *w, int64_t out_features,
                           const float *bias, float *out, int threads, int wide) {
    return distillm_skinny_maps(x, rows, in, 1, &w, &out_features, &bias, &out, threads, wide);
}
