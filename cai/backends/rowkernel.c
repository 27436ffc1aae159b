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
 *   Q4_1: d[16] fp16, m[16] fp16, then for each pair k, k+1 16 bytes: byte j = row j's k | k+1 << 4
 *   Q8_0: d[16] fp16, then for each k 16 int8
 *   BF16: for each k 16 bf16 (no blocks)
 * so the kernel broadcasts x[m,k] and accumulates y[m, panel] directly (no horizontal sums).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
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

/* the 16 rows' fp32 weights for inputs k and k+1: byte j holds row j's k (low nibble) and k+1 */
AI void q4_pair(const uint8_t *q, __m512 d, __m512 m, __m512 *w0, __m512 *w1) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F)), hi = _mm512_srli_epi32(v, 4);
    *w0 = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), m);
    *w1 = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)), m);
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

/* ---- decode attention: one new query per row against its fp32 KV cache ----------------------
 * q [B, H, D] (contiguous), K/V [B, KVH, L, D] with any batch/head strides (positions D apart),
 * keep [B, L] (1 = attend; NULL = all), out [B, H, D]. Each (row, KV head) reads its keys and
 * values once for the H / KVH query heads that share them (grouped-query attention); softmax
 * in fp32 with the maximum subtracted, exp from a degree-6 polynomial (~1 ulp, as torch's
 * vectorised exp). */

static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f), ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2hi, x);
    r = _mm512_fnmadd_ps(n, ln2lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#define ATT_MAX_G 8   /* query heads per KV head */
#define ATT_MAX_D 256

int cai_decode_attention(const float *q, const float *k, const float *v, const uint8_t *keep, float *out,
                         int B, int H, int KVH, int L, int D, long kb, long kh, long vb, long vh,
                         float scale, int threads) {
    int G = KVH > 0 ? H / KVH : 0;
    if (B < 1 || L < 1 || G < 1 || G * KVH != H || G > ATT_MAX_G || D % 16 || D > ATT_MAX_D) return 1;
    int tasks = B * KVH, nd = D / 16;
    int Lp = (L + 15) & ~15;
    int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *s = (float *)_mm_malloc(sizeof(float) * (size_t)G * Lp, 64);
        if (!s) {
#pragma omp atomic write
            bad = 1;
        }
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++) {
            if (!s) continue;
            int b = t / KVH, h = t % KVH;
            const float *kk = k + b * kb + h * kh, *vv = v + b * vb + h * vh;
            const float *qq = q + ((size_t)b * H + (size_t)h * G) * D;
            const uint8_t *m = keep ? keep + (size_t)b * L : 0;
            __m512 qv[ATT_MAX_G][ATT_MAX_D / 16];
            for (int g = 0; g < G; g++)
                for (int i = 0; i < nd; i++)
                    qv[g][i] = _mm512_mul_ps(_mm512_loadu_ps(qq + (size_t)g * D + 16 * i), _mm512_set1_ps(scale));
            float mx[ATT_MAX_G];
            for (int g = 0; g < G; g++) mx[g] = -INFINITY;
            for (int j = 0; j < L; j++) {
                const float *kj = kk + (size_t)j * D;
                _mm_prefetch((const char *)(kj + 4 * D), _MM_HINT_T0);
                if (m && !m[j]) {
                    for (int g = 0; g < G; g++) s[(size_t)g * Lp + j] = -INFINITY;
                    continue;
                }
                for (int g = 0; g < G; g++) {
                    __m512 a = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(kj));
                    for (int i = 1; i < nd; i++) a = _mm512_fmadd_ps(qv[g][i], _mm512_loadu_ps(kj + 16 * i), a);
                    float d = _mm512_reduce_add_ps(a);
                    s[(size_t)g * Lp + j] = d;
                    if (d > mx[g]) mx[g] = d;
                }
            }
            float inv[ATT_MAX_G];
            for (int g = 0; g < G; g++) {
                float *sg = s + (size_t)g * Lp;
                __m512 mxv = _mm512_set1_ps(mx[g]), sum = _mm512_setzero_ps();
                for (int j = 0; j < L; j += 16) {
                    __mmask16 mk = L - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1);
                    __m512 x = _mm512_maskz_loadu_ps(mk, sg + j);
                    __mmask16 live = _mm512_mask_cmp_ps_mask(mk, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                    __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, mxv)));
                    _mm512_mask_storeu_ps(sg + j, mk, e);
                    sum = _mm512_add_ps(sum, e);
                }
                float z = _mm512_reduce_add_ps(sum);
                inv[g] = z > 0 ? 1.0f / z : 0.0f;
            }
            __m512 acc[ATT_MAX_G][ATT_MAX_D / 16];
            for (int g = 0; g < G; g++)
                for (int i = 0; i < nd; i++) acc[g][i] = _mm512_setzero_ps();
            for (int j = 0; j < L; j++) {
                if (m && !m[j]) continue;
                const float *vj = vv + (size_t)j * D;
                _mm_prefetch((const char *)(vj + 4 * D), _MM_HINT_T0);
                for (int g = 0; g < G; g++) {
                    __m512 p = _mm512_set1_ps(s[(size_t)g * Lp + j]);
                    for (int i = 0; i < nd; i++) acc[g][i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 16 * i), acc[g][i]);
                }
            }
            for (int g = 0; g < G; g++)
                for (int i = 0; i < nd; i++)
                    _mm512_storeu_ps(out + ((size_t)b * H + (size_t)h * G + g) * D + 16 * i,
                                     _mm512_mul_ps(acc[g][i], _mm512_set1_ps(inv[g])));
        }
        if (s) _mm_free(s);
    }
    return bad ? 2 : 0;
}

/* ---- a whole decode step of a Llama-style decoder, one call for all layers -------------------
 * Per layer, for B rows (one new token each) at cache position n:
 *   x = rmsnorm(h) * w_in;  q, k, v = x Wq, x Wk, x Wv (+ biases);  rotary on q and k (rotate-half
 *   form, the caller's cos/sin per row);  k, v written at position n of the layer's cache;
 *   a = attention(q, cache[0..n], keep);  h += a Wo;  x = rmsnorm(h) * w_post;
 *   h += (silu(x Wg) * x Wu) Wd
 * then h = rmsnorm(h) * w_final. Each elementwise step rounds as transformers' Llama code does
 * (x * r then w * that; q * cos + rot(q) * sin; residual + out; silu = x / (1 + exp(-x))), so
 * only the order of sums and exp's last bit differ from the torch path. What it saves is the
 * ~50 small torch operations per layer around the matrix products and their Python. */

typedef struct {
    const void *w[7];       /* packed q, k, v, o, gate, up, down (cai_panel_bytes layout) */
    int fmt[7];
    const float *bias[7];   /* or NULL */
    const float *norm_in, *norm_post;
    float *k, *v;           /* this layer's cache buffers: [B, KVH, cap, D] with strides kb, kh */
} cai_layer;

static void rmsnorm(const float *x, const float *w, float *y, int B, int N, float eps) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (size_t)b * N;
        float *yb = y + (size_t)b * N;
        float ss = 0.0f;
        for (int i = 0; i < N; i++) ss += xb[i] * xb[i];
        float r = 1.0f / sqrtf(ss / (float)N + eps);
        for (int i = 0; i < N; i++) yb[i] = w[i] * (xb[i] * r);
    }
}

/* rows [B, heads * D] in place; cos/sin [B, D] */
static void rotary(float *x, const float *cs, const float *sn, int B, int heads, int D) {
    int half = D / 2;
    float tmp[ATT_MAX_D];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < heads; h++) {
            float *v = x + ((size_t)b * heads + h) * D;
            const float *c = cs + (size_t)b * D, *s = sn + (size_t)b * D;
            for (int i = 0; i < D; i++) tmp[i] = v[i];
            for (int i = 0; i < half; i++) v[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
            for (int i = half; i < D; i++) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
}

static void silu_mul(float *g, const float *u, size_t n) {
    size_t i = 0;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

int cai_decode_layers(const cai_layer *layers, int nl, float *h, float *out, const float *norm_final, int B,
                      int hidden, int H, int KVH, int D, int I, float eps, const float *cs, const float *sn,
                      const uint8_t *keep, int n, long kb, long kh, float scale, int threads) {
    int qn = H * D, kvn = KVH * D;
    if (B < 1 || B > 16 || n < 0 || D > ATT_MAX_D || D % 2) return 1;
    int maxk = hidden > I ? hidden : I;
    if (qn > maxk) maxk = qn;
    size_t need = (size_t)B * (hidden + qn + 2 * kvn + qn + hidden + 2 * (size_t)I) + (size_t)16 * maxk;
    float *buf = (float *)_mm_malloc(sizeof(float) * need, 64);
    if (!buf) return 2;
    float *x = buf, *q = x + (size_t)B * hidden, *kk = q + (size_t)B * qn, *vv = kk + (size_t)B * kvn;
    float *att = vv + (size_t)B * kvn, *o = att + (size_t)B * qn, *g = o + (size_t)B * hidden;
    float *u = g + (size_t)B * I, *xt = u + (size_t)B * I;
    int rc = 0;
    for (int l = 0; l < nl && !rc; l++) {
        const cai_layer *L = layers + l;
        rmsnorm(h, L->norm_in, x, B, hidden, eps);
        rc |= cai_rows(L->fmt[0], x, L->w[0], L->bias[0], q, B, qn, hidden, threads, xt);
        rc |= cai_rows(L->fmt[1], x, L->w[1], L->bias[1], kk, B, kvn, hidden, threads, xt);
        rc |= cai_rows(L->fmt[2], x, L->w[2], L->bias[2], vv, B, kvn, hidden, threads, xt);
        if (rc) break;
        rotary(q, cs, sn, B, H, D);
        rotary(kk, cs, sn, B, KVH, D);
        for (int b = 0; b < B; b++)
            for (int j = 0; j < KVH; j++) {
                memcpy(L->k + b * kb + j * kh + (size_t)n * D, kk + ((size_t)b * KVH + j) * D, sizeof(float) * D);
                memcpy(L->v + b * kb + j * kh + (size_t)n * D, vv + ((size_t)b * KVH + j) * D, sizeof(float) * D);
            }
        rc |= cai_decode_attention(q, L->k, L->v, keep, att, B, H, KVH, n + 1, D, kb, kh, kb, kh, scale, threads);
        rc |= cai_rows(L->fmt[3], att, L->w[3], L->bias[3], o, B, hidden, qn, threads, xt);
        if (rc) break;
        for (size_t i = 0; i < (size_t)B * hidden; i++) h[i] = h[i] + o[i];
        rmsnorm(h, L->norm_post, x, B, hidden, eps);
        rc |= cai_rows(L->fmt[4], x, L->w[4], L->bias[4], g, B, I, hidden, threads, xt);
        rc |= cai_rows(L->fmt[5], x, L->w[5], L->bias[5], u, B, I, hidden, threads, xt);
        if (rc) break;
        silu_mul(g, u, (size_t)B * I);
        rc |= cai_rows(L->fmt[6], g, L->w[6], L->bias[6], o, B, hidden, I, threads, xt);
        for (size_t i = 0; i < (size_t)B * hidden; i++) h[i] = h[i] + o[i];
    }
    if (!rc) rmsnorm(h, norm_final, out, B, hidden, eps);
    _mm_free(buf);
    return rc ? 3 : 0;
}
