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
#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM omp_get_thread_num()
#else
#define THREAD_NUM 0
#endif

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
#pragma GCC unroll 32
            for (int k = 0; k < 32; k++) {
                if (k % 4 == 0) _mm_prefetch((const char *)(q + 16 * k) + 1024, _MM_HINT_T0); /* once a line */
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

static int variant(int M) { return M <= 1 ? 0 : M <= 2 ? 1 : M <= 4 ? 2 : M <= 8 ? 3 : M <= 12 ? 4 : 5; }
static int rows_for(int M) { return (int[]){1, 2, 4, 8, 12, 16}[variant(M)]; }

static int rows_shape_ok(int fmt, int M, int N, int K) {
    return M >= 1 && M <= 16 && N % 16 == 0 && K % 32 == 0 && (fmt == Q4_1 || fmt == Q8_0 || fmt == BF16);
}

/* xt [K][MR] <- x [M][K], the rows past M zero (MR = rows_for(M)). Its "omp for" shares the
 * loop among the threads of the caller's parallel region; outside one, one thread runs it. */
static void transpose_shared(const float *x, float *xt, int M, int K) {
    int MR = rows_for(M);
#pragma omp for schedule(static)
    for (int k = 0; k < K; k++)
        for (int r = 0; r < MR; r++) xt[(size_t)k * MR + r] = r < M ? x[(size_t)r * K + k] : 0.0f;
}

/* products y [M][N] = x W^T (+ bias) that read the same transposed input xt; products_shared
 * shares their panels out as one loop among the threads of the caller's parallel region */
typedef struct {
    panel_fn fn;
    const uint8_t *W;
    long pb;
    const float *bias;
    float *y;
    int N, K;
} product;

static product prod(int fmt, const void *W, const float *bias, float *y, int M, int N, int K) {
    product p = {PANELS[fmt - 1][variant(M)], (const uint8_t *)W, cai_panel_bytes(fmt, K), bias, y, N, K};
    return p;
}

static void products_shared(const product *P, int np, const float *xt, int M) {
    int total = 0;
    for (int i = 0; i < np; i++) total += P[i].N / 16;
#pragma omp for schedule(static)
    for (int t = 0; t < total; t++) {
        int i = 0, j = t;
        while (j >= P[i].N / 16) j -= P[i++].N / 16;
        P[i].fn(P[i].W + P[i].pb * j, xt, P[i].K, P[i].bias, P[i].y, M, P[i].N, j);
    }
}

/* xt: scratch of K * 16 floats. Returns 0, or 1 for shapes it does not take. */
int cai_rows(int fmt, const float *x, const void *W, const float *bias, float *y, int M, int N,
             int K, int threads, float *xt) {
    if (!rows_shape_ok(fmt, M, N, K)) return 1;
    product p = prod(fmt, W, bias, y, M, N, K);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        transpose_shared(x, xt, M, K);
        products_shared(&p, 1, xt, M);
    }
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

static int attention_ok(int B, int H, int KVH, int L, int D) {
    int G = KVH > 0 ? H / KVH : 0;
    return B >= 1 && L >= 1 && G >= 1 && G * KVH == H && G <= ATT_MAX_G && D % 16 == 0 && D <= ATT_MAX_D;
}

/* one (row b, KV head h): its G query heads against positions 0..L-1; s: scratch of G * Lp floats */
static void attend(const float *q, const float *k, const float *v, const uint8_t *keep, float *out, int b, int h,
                   int H, int KVH, int L, int D, long kb, long kh, long vb, long vh, float scale, float *s) {
    int G = H / KVH, nd = D / 16, Lp = (L + 15) & ~15;
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

int cai_decode_attention(const float *q, const float *k, const float *v, const uint8_t *keep, float *out,
                         int B, int H, int KVH, int L, int D, long kb, long kh, long vb, long vh,
                         float scale, int threads) {
    if (!attention_ok(B, H, KVH, L, D)) return 1;
    int tasks = B * KVH;
    size_t per = (size_t)(H / KVH) * ((L + 15) & ~15);
    float *s = (float *)_mm_malloc(sizeof(float) * per * (threads > 1 ? threads : 1), 64);
    if (!s) return 2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *mine = s + per * THREAD_NUM;
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; t++)
            attend(q, k, v, keep, out, t / KVH, t % KVH, H, KVH, L, D, kb, kh, vb, vh, scale, mine);
    }
    _mm_free(s);
    return 0;
}

static float sum_sq(const float *x, int N) {
    __m512 a = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= N; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        a = _mm512_add_ps(a, _mm512_mul_ps(v, v));
    }
    float s = _mm512_reduce_add_ps(a);
    for (; i < N; i++) s += x[i] * x[i];
    return s;
}

/* y [B][N] = w * (x * 1/sqrt(mean(x^2) + eps)), as LlamaRMSNorm rounds it */
static void rmsnorm(const float *x, const float *w, float *y, int B, int N, float eps) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + (size_t)b * N;
        float r = 1.0f / sqrtf(sum_sq(xb, N) / (float)N + eps);
        for (int i = 0; i < N; i++) y[(size_t)b * N + i] = w[i] * (xb[i] * r);
    }
}

/* Below, functions with "omp for" share their loop among the threads of the caller's parallel
 * region (each ends with a barrier); called outside one, a single thread runs it all. */

/* rmsnorm written transposed for the panels: xt [N][MR], rows past B zero */
static void rmsnorm_t(const float *x, const float *w, float *xt, int B, int N, float eps) {
    int MR = rows_for(B);
    float r[16];
    for (int b = 0; b < B; b++) r[b] = 1.0f / sqrtf(sum_sq(x + (size_t)b * N, N) / (float)N + eps);
#pragma omp for schedule(static)
    for (int i = 0; i < N; i++)
        for (int b = 0; b < MR; b++) xt[(size_t)i * MR + b] = b < B ? w[i] * (x[(size_t)b * N + i] * r[b]) : 0.0f;
}

/* x += y, both [B][N] */
static void add_shared(float *x, const float *y, int B, int N) {
#pragma omp for schedule(static)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < N; i++) x[(size_t)b * N + i] = x[(size_t)b * N + i] + y[(size_t)b * N + i];
}

/* one row's heads [heads][D] in place, rotate-half form: x * cos + rot(x) * sin */
static void rotary(float *x, const float *c, const float *s, int heads, int D) {
    int half = D / 2;
    float tmp[ATT_MAX_D];
    for (int h = 0; h < heads; h++) {
        float *v = x + (size_t)h * D;
        for (int i = 0; i < D; i++) tmp[i] = v[i];
        for (int i = 0; i < half; i++) v[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
        for (int i = half; i < D; i++) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
    }
}

/* g = silu(g) * u = g / (1 + exp(-g)) * u */
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

/* ---- a whole decode step of a Llama-style decoder, one call ---------------------------------
 * For B rows (one new token each) at cache position n: h = embed[ids]; per layer
 *   x = rmsnorm(h) * w_in;  q, k, v = x Wq, x Wk, x Wv (+ biases);  rotary on q and k (rotate-half
 *   form, row b's cos/sin: row pos[b] of the caller's tables);  k, v written at position n of the
 *   layer's cache;  a = attention(q, cache[0..n], keep);  h += a Wo;  x = rmsnorm(h) * w_post;
 *   h += (silu(x Wg) * x Wu) Wd
 * then x = rmsnorm(h) * w_final and out = x W_out^T (+ bias): the logits, or x itself where the
 * output layer is not packed. Each elementwise step rounds as transformers' Llama code does
 * (x * r then w * that; q * cos + rot(q) * sin; residual + out; silu = x / (1 + exp(-x))), so
 * only the order of sums and exp's last bit differ from the torch path. What it saves is the
 * ~50 small torch operations per layer around the matrix products and their Python; the whole
 * step is one OpenMP parallel region (barriers between stages, no fork/join per product). */

typedef struct {
    const void *w[7];       /* packed q, k, v, o, gate, up, down (cai_panel_bytes layout) */
    int fmt[7];
    const float *bias[7];   /* or NULL */
    const float *norm_in, *norm_post;
    float *k, *v;           /* this layer's cache buffers: [B, KVH, cap, D] with strides kb, kh */
} cai_layer;

typedef struct {
    const cai_layer *layers;
    int nl, hidden, H, KVH, D, I, vocab;
    float eps, scale;
    const float *embed;     /* token embeddings [vocab][hidden], fp32 */
    const float *norm_final;
    const void *out_w;      /* packed output layer [vocab][hidden], or NULL: out = the normed h */
    int out_fmt;
    const float *out_bias;  /* or NULL */
} cai_decoder;

/* Returns 0; 1 for shapes it does not take; 2 out of memory; 3 a token id or position outside
 * the embedding or the cos/sin tables (rows: positions, D floats each). */
int cai_decode_step(const cai_decoder *m, const int64_t *ids, const int64_t *pos, const float *cs,
                    const float *sn, int positions, const uint8_t *keep, int B, int n, long kb, long kh,
                    float *out, int threads) {
    const int hidden = m->hidden, H = m->H, KVH = m->KVH, D = m->D, I = m->I, nl = m->nl;
    const int qn = H * D, kvn = KVH * D, L = n + 1;
    const float eps = m->eps, scale = m->scale;
    if (B < 1 || B > 16 || n < 0 || !attention_ok(B, H, KVH, L, D)) return 1;
    const int N[7] = {qn, kvn, kvn, hidden, I, I, hidden}, K[7] = {hidden, hidden, hidden, qn, hidden, hidden, I};
    for (int l = 0; l < nl; l++)
        for (int i = 0; i < 7; i++)
            if (!rows_shape_ok(m->layers[l].fmt[i], B, N[i], K[i])) return 1;
    if (m->out_w && !rows_shape_ok(m->out_fmt, B, m->vocab, hidden)) return 1;
    for (int b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= m->vocab || pos[b] < 0 || pos[b] >= positions) return 3;
    int maxk = hidden > I ? hidden : I;
    if (qn > maxk) maxk = qn;
    size_t per = (size_t)(H / KVH) * ((L + 15) & ~15);  /* attention scratch per thread */
    int nt = threads > 1 ? threads : 1;
    size_t need = (size_t)B * (2 * (size_t)hidden + 2 * (size_t)qn + 2 * kvn + 2 * (size_t)I) + (size_t)16 * maxk + per * nt;
    float *buf = (float *)_mm_malloc(sizeof(float) * need, 64);
    if (!buf) return 2;
    float *h = buf, *q = h + (size_t)B * hidden, *kk = q + (size_t)B * qn, *vv = kk + (size_t)B * kvn;
    float *att = vv + (size_t)B * kvn, *o = att + (size_t)B * qn, *g = o + (size_t)B * hidden;
    float *u = g + (size_t)B * I, *xt = u + (size_t)B * I, *scratch = xt + (size_t)16 * maxk;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *s = scratch + per * THREAD_NUM;
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) memcpy(h + (size_t)b * hidden, m->embed + (size_t)ids[b] * hidden, sizeof(float) * hidden);
        for (int l = 0; l < nl; l++) {
            const cai_layer *Ly = m->layers + l;
            product qkv[3], gu[2], od[1];
            for (int i = 0; i < 3; i++) qkv[i] = prod(Ly->fmt[i], Ly->w[i], Ly->bias[i], i ? (i == 1 ? kk : vv) : q, B, N[i], K[i]);
            rmsnorm_t(h, Ly->norm_in, xt, B, hidden, eps);  /* one transposed input for q, k and v */
            products_shared(qkv, 3, xt, B);
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                const float *c = cs + (size_t)pos[b] * D, *si = sn + (size_t)pos[b] * D;
                rotary(q + (size_t)b * qn, c, si, H, D);
                rotary(kk + (size_t)b * kvn, c, si, KVH, D);
                for (int j = 0; j < KVH; j++) {
                    memcpy(Ly->k + b * kb + j * kh + (size_t)n * D, kk + (size_t)b * kvn + (size_t)j * D, sizeof(float) * D);
                    memcpy(Ly->v + b * kb + j * kh + (size_t)n * D, vv + (size_t)b * kvn + (size_t)j * D, sizeof(float) * D);
                }
            }
#pragma omp for schedule(static)
            for (int t = 0; t < B * KVH; t++)
                attend(q, Ly->k, Ly->v, keep, att, t / KVH, t % KVH, H, KVH, L, D, kb, kh, kb, kh, scale, s);
            transpose_shared(att, xt, B, qn);
            od[0] = prod(Ly->fmt[3], Ly->w[3], Ly->bias[3], o, B, hidden, qn);
            products_shared(od, 1, xt, B);
            add_shared(h, o, B, hidden);
            rmsnorm_t(h, Ly->norm_post, xt, B, hidden, eps);  /* one for gate and up */
            gu[0] = prod(Ly->fmt[4], Ly->w[4], Ly->bias[4], g, B, I, hidden);
            gu[1] = prod(Ly->fmt[5], Ly->w[5], Ly->bias[5], u, B, I, hidden);
            products_shared(gu, 2, xt, B);
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) silu_mul(g + (size_t)b * I, u + (size_t)b * I, (size_t)I);
            transpose_shared(g, xt, B, I);
            od[0] = prod(Ly->fmt[6], Ly->w[6], Ly->bias[6], o, B, hidden, I);
            products_shared(od, 1, xt, B);
            add_shared(h, o, B, hidden);
        }
        if (m->out_w) {
            product lm = prod(m->out_fmt, m->out_w, m->out_bias, out, B, m->vocab, hidden);
            rmsnorm_t(h, m->norm_final, xt, B, hidden, eps);
            products_shared(&lm, 1, xt, B);
        } else {
#pragma omp single
            rmsnorm(h, m->norm_final, out, B, hidden, eps);
        }
    }
    _mm_free(buf);
    return 0;
}
