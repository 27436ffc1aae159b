/* cai: y[M,N] = x[M,K] @ W[N,K]^T (+ bias) for decode steps (M <= 16 rows), fp32 arithmetic.
 * Built once per machine by cai/backends/rowkernel.py (cc -O3 -mavx512f ... -fopenmp); the
 * threads are torch's OpenMP threads (the same libgomp).
 *
 * W stays in the format its values came in (4-bit Q4_1 or 8-bit Q8_0 blocks of a GGUF file,
 * or bf16) and is expanded to fp32 in registers, exactly as gguf-py dequantises it: d * q + m
 * with two roundings (built with -ffp-contract=off), d * q, or the bf16 bits shifted up. The
 * products and sums are fp32. A decode step reads every weight once for all its rows, so
 * reading 5 (Q4_1), 8.5 (Q8_0) or 16 (bf16) bits per weight instead of 32 is what it gains.
 *
 * Layout (packed by cai/backends/rowkernel.py): panels of 16 output rows; per panel, per block
 * of 32 inputs k, the 16 rows' values for each k lie together:
 *   Q4_1: d[16] fp16, m[16] fp16, then for each k 8 bytes: byte j = row j | row j+8 << 4
 *   Q8_0: d[16] fp16, then for each k 16 int8
 *   BF16: for each k 16 bf16 (no blocks)
 * so the kernel broadcasts x[m,k] and accumulates y[m, panel] directly (no horizontal sums).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

enum { Q4_1 = 1, Q8_0 = 2, BF16 = 3 };

long cai_panel_bytes(int fmt, int K) {
    switch (fmt) {
    case Q4_1: return (long)K / 32 * 320;
    case Q8_0: return (long)K / 32 * 544;
    case BF16: return (long)K * 32;
    default: return -1;
    }
}

#define AI static inline __attribute__((always_inline))

/* the 16 rows' fp32 weights for inputs k (and k+1 for the nibble pair) */
AI void q4_pair(const uint8_t *q, __m512 d, __m512 m, __m512 *w0, __m512 *w1) {
    __m128i v = _mm_loadu_si128((const __m128i *)q); /* k: bytes 0-7, k+1: bytes 8-15 */
    __m128i f = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, f), hi = _mm_and_si128(_mm_srli_epi16(v, 4), f);
    __m128i a = _mm_unpacklo_epi64(lo, hi), b = _mm_unpackhi_epi64(lo, hi);
    *w0 = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a))), m);
    *w1 = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))), m);
}

AI __m512 q8_one(const int8_t *q, __m512 d) {
    __m128i v = _mm_loadu_si128((const __m128i *)q);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d);
}

AI __m512 bf_one(const uint16_t *q) {
    __m256i h = _mm256_loadu_si256((const __m256i *)q);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define FMA_ROWS(W, K_)                                                                   \
    do {                                                                                  \
        const float *xk = xt + (size_t)(K_) * MR;                                         \
        _Pragma("GCC unroll 16") for (int r = 0; r < MR; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xk[r]), W, acc[r]); \
    } while (0)

/* one panel of 16 output rows against MR rows of x (xt: x transposed, [K][MR]) */
AI void panel(const int fmt, const int MR, const uint8_t *p, const float *xt, int K, __m512 *acc) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    if (fmt == BF16) {
        const uint16_t *q = (const uint16_t *)p;
        for (int k = 0; k < K; k++) {
            _mm_prefetch((const char *)(q + 16 * k) + 1024, _MM_HINT_T0);
            __m512 w = bf_one(q + 16 * k);
            FMA_ROWS(w, k);
        }
        return;
    }
    for (int b = 0; b < K / 32; b++) {
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        if (fmt == Q4_1) {
            __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
            const uint8_t *q = p + 64;
            for (int k = 0; k < 32; k += 2) {
                _mm_prefetch((const char *)(q + 8 * k) + 1024, _MM_HINT_T0);
                __m512 w0, w1;
                q4_pair(q + 8 * k, d, m, &w0, &w1);
                FMA_ROWS(w0, b * 32 + k);
                FMA_ROWS(w1, b * 32 + k + 1);
            }
            p += 320;
        } else {
            const int8_t *q = (const int8_t *)(p + 32);
            for (int k = 0; k < 32; k++) {
                _mm_prefetch((const char *)(q + 16 * k) + 1024, _MM_HINT_T0);
                __m512 w = q8_one(q + 16 * k, d);
                FMA_ROWS(w, b * 32 + k);
            }
            p += 544;
        }
    }
}

typedef void (*panel_fn)(const uint8_t *, const float *, int, const float *, float *, int, int, int);

#define DEF(F, MR)                                                                              \
    static void panel_##F##_##MR(const uint8_t *p, const float *xt, int K, const float *bias,     \
                                 float *y, int M, int N, int j) {                               \
        __m512 acc[MR];                                                                         \
        panel(F, MR, p, xt, K, acc);                                                            \
        __m512 bv = bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();                \
        _Pragma("GCC unroll 16") for (int r = 0; r < MR; r++) if (r < M)                       \
            _mm512_storeu_ps(y + (size_t)r * N + 16 * j, _mm512_add_ps(acc[r], bv));             \
    }
#define DEFS(F) DEF(F, 1) DEF(F, 2) DEF(F, 4) DEF(F, 8) DEF(F, 12) DEF(F, 16)
DEFS(Q4_1)
DEFS(Q8_0)
DEFS(BF16)
#define ROW(F) {panel_##F##_1, panel_##F##_2, panel_##F##_4, panel_##F##_8, panel_##F##_12, panel_##F##_16}
static const panel_fn PANELS[3][6] = {ROW(Q4_1), ROW(Q8_0), ROW(BF16)};

/* xt: scratch of K * 16 floats. Returns 0, or 1 for shapes it does not take. */
int cai_rows(int fmt, const float *x, const void *Wv, const float *bias, float *y, int M, int N,
             int K, int threads, float *xt) {
    const uint8_t *W = (const uint8_t *)Wv;
    if (M < 1 || M > 16 || N % 16 || K % 32 || (fmt != Q4_1 && fmt != Q8_0 && fmt != BF16)) return 1;
    int i = M <= 1 ? 0 : M <= 2 ? 1 : M <= 4 ? 2 : M <= 8 ? 3 : M <= 12 ? 4 : 5;
    int MR = (int[]){1, 2, 4, 8, 12, 16}[i];
    for (int k = 0; k < K; k++)
        for (int r = 0; r < MR; r++) xt[(size_t)k * MR + r] = r < M ? x[(size_t)r * K + k] : 0.0f;
    panel_fn fn = PANELS[fmt - 1][i];
    long pb = cai_panel_bytes(fmt, K);
    int panels = N / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int j = 0; j < panels; j++) fn(W + pb * j, xt, K, bias, y, M, N, j);
    return 0;
}
