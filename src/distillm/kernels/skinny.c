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
#include <math.h>
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

/* ROWS(N) for the tile's n input rows, 1 to TILE, with N a constant in each case (the loops over rows unroll). */
#define FOR_TILE_ROWS(n)                                                                               \
    switch (n) {                                                                                       \
    case 1: ROWS(1)                                                                                    \
    case 2: ROWS(2)                                                                                    \
    case 3: ROWS(3)                                                                                    \
    case 4: ROWS(4)                                                                                    \
    case 5: ROWS(5)                                                                                    \
    case 6: ROWS(6)                                                                                    \
    case 7: ROWS(7)                                                                                    \
    default: ROWS(8)                                                                                   \
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
    FOR_TILE_ROWS(n)
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
    FOR_TILE_ROWS(n)
#undef ROWS
}

/* ---- entry points ---- */

/* 1 where this CPU runs the kernel (AVX2 and FMA), else 0: the caller must not call the functions below. */
int distillm_skinny_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* 1 where the AVX-512 path can be taken (AVX-512F), else 0. */
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

/* ---- a whole decoding layer of the Llama layout ---- */

/* A Llama-layout layer (Llama, Mistral, Qwen2): what distillm_decode_layer reads, filled by skinny.py. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inner;
    const float *norm1, *norm2; /* the RMS norms' weights [hidden], before attention and before the MLP */
    double eps1, eps2;
    /* q [heads * d, hidden], k and v [kv_heads * d, hidden], o [hidden, heads * d], gate and up [inner, hidden],
     * down [hidden, inner]; biases (or NULL) in the same order */
    const float *w[7], *b[7];
    double scaling; /* of the attention scores */
} decode_layer_t;

/* out = weight * (x * (1 / sqrt(mean(x^2) + eps))), the mean summed in double. */
static void rms_norm(const float *x, const float *weight, double eps, int64_t n, float *out) {
    double squares = 0.0;
    for (int64_t i = 0; i < n; i++) squares += (double)x[i] * x[i];
    const float inverse = (float)(1.0 / sqrt(squares / (double)n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
}

/* x [d] rotated by the rotary embedding into out [d]: x * cos + rotate_half(x) * sin, rotate_half(x) being
 * (-x[d/2:], x[:d/2]); each product rounded, then their sum, as the modeling code computes it. */
static void rotate(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i] * cos[i], b = -x[i + half] * sin[i];
        out[i] = a + b;
    }
    for (int64_t i = half; i < d; i++) {
        const float a = x[i] * cos[i], b = x[i - half] * sin[i];
        out[i] = a + b;
    }
}

/* Attention of one query q [d] over keys and values [positions, d] (rows of a cache): key j < positions - 1
 * only where mask[j] (NULL: all), the last (the query's own position) always; scores [positions] is scratch.
 * Writes out [d]. */
__attribute__((target("avx2,fma"))) static void attend(const float *q, const float *keys, const float *values,
                                                      int64_t positions, int64_t d, const uint8_t *mask,
                                                      double scaling, float *scores, float *out) {
    float largest = -INFINITY;
    for (int64_t j = 0; j < positions; j++) {
        if (mask && !mask[j] && j < positions - 1) continue;
        const float *k = keys + j * d;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; i++) dot += q[i] * k[i];
        scores[j] = (float)(dot * scaling);
        if (scores[j] > largest) largest = scores[j];
    }
    double total = 0.0;
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < positions; j++) {
        if (mask && !mask[j] && j < positions - 1) continue;
        const float p = expf(scores[j] - largest);
        total += p;
        const float *v = values + j * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[i] += p * v[i];
    }
    const float inverse = (float)(1.0 / total); /* > 0: the query's own position is never masked */
    for (int64_t i = 0; i < d; i++) out[i] *= inverse;
}

/* One decoding step of layer L for `rows` rows, in place on the residual stream hidden [rows, hidden]:
 *   hidden += o(attention(rotary(q(n)), rotary(k(n)), v(n)))    n = norm1(hidden)
 *   hidden += down(silu(gate(m)) * up(m))                       m = norm2(hidden)
 * cos, sin [rows, head_dim]: the rotary embedding at each row's position. The cache keys, values
 * [rows, kv_heads, capacity, head_dim] holds positions [0, length); this step's keys and values are written at
 * position `length` and attended with them: key j < length of row r only where key_mask[r * capacity + j]
 * (NULL: all), the step's own always.
 * The linear maps run as distillm_skinny_maps with `threads` and `wide`. Returns 0, or -1 where memory for the
 * step's intermediate results could not be had (hidden and the cache at position `length` are then undefined). */
int distillm_decode_layer(const decode_layer_t *L, float *hidden, int64_t rows, const float *cos, const float *sin,
                          float *keys, float *values, int64_t capacity, int64_t length, const uint8_t *key_mask,
                          int threads, int wide) {
    const int64_t H = L->hidden, d = L->head_dim, heads = L->heads, kv = L->kv_heads, I = L->inner;
    const int64_t nq = heads * d, nkv = kv * d, positions = length + 1, group = heads / kv;
    const size_t floats = (size_t)rows * (H + 2 * nq + 2 * nkv + 2 * I + H) + (size_t)rows * heads * positions;
    float *scratch = malloc(floats * sizeof(float));
    if (!scratch) return -1;
    float *normed = scratch, *q = normed + rows * H, *k = q + rows * nq, *v = k + rows * nkv;
    float *attended = v + rows * nkv, *gate = attended + rows * nq, *up = gate + rows * I, *out = up + rows * I;
    float *scores = out + rows * H;

    for (int64_t r = 0; r < rows; r++) rms_norm(hidden + r * H, L->norm1, L->eps1, H, normed + r * H);
    {
        const float *w[3] = {L->w[0], L->w[1], L->w[2]}, *b[3] = {L->b[0], L->b[1], L->b[2]};
        const int64_t outs[3] = {nq, nkv, nkv};
        float *o[3] = {q, k, v};
        if (distillm_skinny_maps(normed, rows, H, 3, w, outs, b, o, threads, wide)) goto failed;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * d, *s = sin + r * d;
        for (int64_t h = 0; h < kv; h++) {
            const int64_t at = ((r * kv + h) * capacity + length) * d;
            rotate(k + r * nkv + h * d, c, s, d, keys + at);
            memcpy(values + at, v + r * nkv + h * d, d * sizeof(float));
        }
        for (int64_t h = 0; h < heads; h++) { /* rotated queries go to `attended`, free until the attention */
            rotate(q + r * nq + h * d, c, s, d, attended + r * nq + h * d);
        }
    }
    memcpy(q, attended, rows * nq * sizeof(float));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < rows * heads; t++) {
        const int64_t r = t / heads, h = t % heads, cached = (r * kv + h / group) * capacity * d;
        attend(q + r * nq + h * d, keys + cached, values + cached, positions, d,
               key_mask ? key_mask + r * capacity : NULL, L->scaling, scores + t * positions,
               attended + r * nq + h * d);
    }
    if (distillm_skinny_maps(attended, rows, nq, 1, &L->w[3], &H, &L->b[3], &out, threads, wide)) goto failed;
    for (int64_t i = 0; i < rows * H; i++) hidden[i] = hidden[i] + out[i];

    for (int64_t r = 0; r < rows; r++) rms_norm(hidden + r * H, L->norm2, L->eps2, H, normed + r * H);
    {
        const float *w[2] = {L->w[4], L->w[5]}, *b[2] = {L->b[4], L->b[5]};
        const int64_t outs[2] = {I, I};
        float *o[2] = {gate, up};
        if (distillm_skinny_maps(normed, rows, H, 2, w, outs, b, o, threads, wide)) goto failed;
    }
    for (int64_t i = 0; i < rows * I; i++) {
        const float g = gate[i];
        gate[i] = (g / (1.0f + expf(-g))) * up[i]; /* silu(gate) * up */
    }
    if (distillm_skinny_maps(gate, rows, I, 1, &L->w[6], &H, &L->b[6], &out, threads, wide)) goto failed;
    for (int64_t i = 0; i < rows * H; i++) hidden[i] = hidden[i] + out[i];
    free(scratch);
    return 0;
failed:
    free(scratch);
    return -1;
}
