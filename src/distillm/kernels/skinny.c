/* A float32 linear map for a few input rows (a decoding step), built and loaded by distillm/kernels/skinny.py.
 *
 * out[r, o] = bias[o] + sum_i x[r, i] * w[o, i]      x [rows, in], w [out, in], out [rows, out], row-major
 *
 * A decoding step multiplies a handful of rows by every weight matrix of the model, so it is bound by reading
 * the weights: each weight row is read once from memory (prefetched ahead of use) and multiplied into every
 * input row while it sits in the L1 cache, 8 input rows at a time in 8 AVX2 accumulators. The output rows
 * are split among OpenMP threads by blocks of weight rows.
 *
 * Each output is summed the same way whatever the other rows are (8 interleaved partial sums over the input,
 * then their sum, then the bias), so a row's result does not depend on the batch it is computed in.
 */
#include <immintrin.h>
#include <stdint.h>

#define TILE 8           /* input rows per pass over a weight row */
#define PREFETCH 1024    /* floats ahead of the current weight position (4 KiB) */

__attribute__((target("avx2,fma"))) static inline float lane_sum(__m256 a) {
    __m128 low = _mm256_castps256_ps128(a), high = _mm256_extractf128_ps(a, 1);
    low = _mm_add_ps(low, high);
    low = _mm_add_ps(low, _mm_movehl_ps(low, low));
    low = _mm_add_ss(low, _mm_shuffle_ps(low, low, 1));
    return _mm_cvtss_f32(low);
}

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
        for (int64_t i = vectorised; i < in; i++) total += x[r * in + i] * w[i];
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

/* 1 where this CPU runs the kernel (AVX2 and FMA), else 0: the caller must not call distillm_skinny_linear. */
int distillm_skinny_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

void distillm_skinny_linear(const float *x, int64_t rows, int64_t in, const float *w, int64_t out_features,
                            const float *bias, float *out, int threads) {
    /* Blocks of 64 weight rows per thread at a time; a block is read once for all the input rows, so for
     * more than TILE rows the other tiles find it in L1/L2. */
    const int64_t block = 64;
    const int64_t blocks = (out_features + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * block;
        const int64_t last = first + block < out_features ? first + block : out_features;
        for (int64_t r = 0; r < rows; r += TILE) {
            const int n = rows - r < TILE ? (int)(rows - r) : TILE;
            tile(x + r * in, in, w, bias, out + r * out_features, out_features, first, last, n);
        }
    }
}
