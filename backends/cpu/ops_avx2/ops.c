/* The small ops of a decoder layer, AVX2 + FMA: RMSNorm, RoPE, causal GQA attention, SwiGLU.
 *
 * At decode, each of these is a few microseconds of arithmetic behind several numpy calls
 * (~2-5 us each); 30 layers of them cost more than the quantized matmuls. One C call
 * each brings them under the matmuls. Attention also serves prefill: a fused
 * score -> exp -> weighted-sum per query row does no more work than the causal block GEMMs
 * and avoids numpy's float32 exp over the score block.
 *
 * Numerics: float32 throughout, as the numpy path, with a different summation order and
 * a polynomial exp (Cephes expf, < 2 ulp); tests compare both paths.
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops_avx2.h"
#include "simd.h"

/* exp(x) for 8 floats: Cephes' expf (as in avx_mathfun), relative error < 2 ulp on [-87, 88] */
static inline __m256 exp8(__m256 x)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    /* exp(x) = 2^n * exp(g), n = round(x / ln 2), g = x - n ln 2 (ln 2 split in two for accuracy) */
    __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
    fx = _mm256_floor_ps(fx);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, one));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

/* ---- RMSNorm (arXiv:1910.07467): y = x / sqrt(mean(x^2) + eps) * w ---- */

void ops_rms_norm(const float *x, int64_t ldx, const float *w, int64_t n, int64_t d, float eps, float *out)
{
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * ldx;
        float *oi = out + i * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            const __m256 v = _mm256_loadu_ps(xi + j);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum8(acc);
        for (; j < d; j++)
            ss += xi[j] * xi[j];
        const float scale = 1.0f / sqrtf(ss / (float)d + eps);
        const __m256 s = _mm256_set1_ps(scale);
        for (j = 0; j + 8 <= d; j += 8)
            _mm256_storeu_ps(oi + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + j), s), _mm256_loadu_ps(w + j)));
        for (; j < d; j++)
            oi[j] = xi[j] * scale * w[j];
    }
}

/* ---- RoPE (arXiv:2104.09864): rotate pairs by pos * theta_i, cos/sin precomputed ----
 * interleaved: pairs (x[2i], x[2i+1]); neox: pairs (x[i], x[i + half]). Dimensions past
 * 2 * half are copied unrotated. */

void ops_rope(const float *x, int64_t sx_row, int64_t sx_head, int64_t n, int64_t heads, int64_t hd,
              const float *cos_t, const float *sin_t, int64_t half, const int64_t *pos, int neox, float *out)
{
    for (int64_t i = 0; i < n; i++) {
        const float *c = cos_t + pos[i] * half, *s = sin_t + pos[i] * half;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + i * sx_row + h * sx_head;
            float *oh = out + (i * heads + h) * hd;
            if (neox) {
                int64_t j = 0;
                for (; j + 8 <= half; j += 8) {
                    const __m256 x0 = _mm256_loadu_ps(xh + j), x1 = _mm256_loadu_ps(xh + half + j);
                    const __m256 cj = _mm256_loadu_ps(c + j), sj = _mm256_loadu_ps(s + j);
                    _mm256_storeu_ps(oh + j, _mm256_fmsub_ps(x0, cj, _mm256_mul_ps(x1, sj)));
                    _mm256_storeu_ps(oh + half + j, _mm256_fmadd_ps(x0, sj, _mm256_mul_ps(x1, cj)));
                }
                for (; j < half; j++) {
                    const float x0 = xh[j], x1 = xh[half + j];
                    oh[j] = x0 * c[j] - x1 * s[j];
                    oh[half + j] = x0 * s[j] + x1 * c[j];
                }
            } else {
                for (int64_t j = 0; j < half; j++) {
                    const float x0 = xh[2 * j], x1 = xh[2 * j + 1];
                    oh[2 * j] = x0 * c[j] - x1 * s[j];
                    oh[2 * j + 1] = x0 * s[j] + x1 * c[j];
                }
            }
            for (int64_t j = 2 * half; j < hd; j++)
                oh[j] = xh[j];
        }
    }
}

/* ---- log-sum-exp of a row of logits: the normalizer of every log-probability reported ----
 * numpy's float32 exp runs at ~1.8 ns an element here: 90 us a 49k-token row, per sequence
 * and step. exp8 over 8 lanes, partial sums flushed to double every 1024 elements. NaN is
 * not detected (max_ps drops it): callers validate the logits first. */
double ops_logsumexp(const float *x, int64_t d)
{
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8)
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + j));
    float mx = hmax8(mv);
    for (; j < d; j++)
        mx = x[j] > mx ? x[j] : mx;
    if (!isfinite(mx))
        return mx;
    const __m256 mxv = _mm256_set1_ps(mx);
    double total = 0.0;
    j = 0;
    while (j + 8 <= d) {
        __m256 acc = _mm256_setzero_ps();
        for (const int64_t end = j + 1024; j + 8 <= d && j < end; j += 8)
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mxv)));
        total += hsum8(acc);
    }
    for (; j < d; j++)
        total += expf(x[j] - mx);
    return mx + log(total);
}

/* ---- SwiGLU (arXiv:2002.05202): silu(gate) * up over (n, 2f) packed [gate | up] ---- */

typedef struct {
    const float *gu;
    int64_t ld, f;
    float *out;
} SiluCtx;

static void silu_row(void *p, int64_t i)
{
    const SiluCtx *c = p;
    const float *g = c->gu + i * c->ld, *u = g + c->f;
    float *o = c->out + i * c->f;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= c->f; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv)));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + j)));
    }
    for (; j < c->f; j++)
        o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

void ops_silu_mul(const float *gu, int64_t ld, int64_t n, int64_t f, float *out, int nthreads)
{
    SiluCtx c = {gu, ld, f, out};
    ops_parallel_for(n, n * f >= (1 << 16) ? nthreads : 1, silu_row, &c);
}

/* ---- causal grouped-query attention ----
 * For one query row and one query head: scores s_j = q . k_j / sqrt(hd) for the
 * keys it can see (j <= its position), softmax, then sum_j p_j v_j. Scores are computed
 * 8 keys at a time (8 accumulators, then one transpose-add). */

typedef struct {
    const float *q;     /* (n, heads, hd) contiguous */
    const float *k, *v; /* (n_kv, t, hd) per sequence, rows contiguous */
    int64_t sk_seq, sv_seq;   /* between sequences: 0 when every query row reads one sequence */
    int64_t sk_head, sv_head; /* between kv heads */
    const int64_t *pos; /* (n,) the position of each query row: it sees keys 0..pos */
    int64_t n, heads, n_kv, t, hd;
    float *out; /* (n, heads * hd) */
    /* paged keys and values (NULL: the layout above): row i's key j lives in block
     * table[i * table_ld + j / block], at slot j % block; k and v then point at one layer of
     * the arena, (n_kv, blocks, block, hd) contiguous, and sk_seq/sv_seq are unused */
    const int64_t *table;
    int64_t table_ld, block;
    int64_t per_task; /* query heads a task: the kv head's whole group, or 1 (attn_run) */
} AttnCtx;

/* Keys (or values) j0.. of query row i as one run of consecutive rows: returns the first row
 * and sets *len (the rest of the block when paged, else every key up to nk). One division per
 * block, none per key. Blocks hold a multiple of 8 keys, so the 8-key groups below start at
 * the same j whether or not the keys are paged: the same bits either way. */
static inline const float *kv_run(const AttnCtx *c, const float *base, int64_t i, int64_t j0, int64_t nk,
                                  int64_t *len)
{
    if (!c->table) {
        *len = nk - j0;
        return base + j0 * c->hd;
    }
    const int64_t blk = j0 / c->block, off = j0 - blk * c->block;
    *len = c->block - off < nk - j0 ? c->block - off : nk - j0;
    return base + (c->table[i * c->table_ld + blk] * c->block + off) * c->hd;
}

/* 8 dot products at once: lane j of the result = sum of acc[j]'s lanes */
static inline __m256 hsum8x8(const __m256 a[8])
{
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* lanes: [0 1 2 3 | 0 1 2 3] of keys 0-3 and 4-7 split across 128-bit halves */
    const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* o[e0 .. e0 + 8 W) = inv * sum_j p_j v_j[e0 ..], j over the row's keys in order. W is a
 * constant, so the accumulators stay in registers: the array of hd / 8 indexed at run time that
 * this replaces lived on the stack, a load and a store around every multiply-add (prefill
 * attention of the 1B shape, 512 tokens: 18.4 -> 13.6 ms a layer, the same bits) */
static inline __attribute__((always_inline)) void pv_cols(const AttnCtx *c, const float *v, int64_t i, const float *p,
                                                          int64_t nk, int64_t e0, const int W, float inv, float *o)
{
    __m256 acc[8];
    for (int e = 0; e < W; e++)
        acc[e] = _mm256_setzero_ps();
    for (int64_t len, j0 = 0; j0 < nk; j0 += len) {
        const float *vr = kv_run(c, v, i, j0, nk, &len) + e0;
        for (int64_t u = 0; u < len; u++) {
            const __m256 pj = _mm256_set1_ps(p[j0 + u]);
            for (int e = 0; e < W; e++)
                acc[e] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + u * c->hd + 8 * e), acc[e]);
        }
    }
    for (int e = 0; e < W; e++)
        _mm256_storeu_ps(o + e0 + 8 * e, _mm256_mul_ps(acc[e], _mm256_set1_ps(inv)));
}

/* Query row i, heads h0 .. h0 + per_task - 1 (of one kv head g): one after another over the
 * same keys and values, which the first head brings into L1 for the others. Each head's
 * arithmetic is the same whatever the grouping. */
static void attn_task(void *p, int64_t task)
{
    const AttnCtx *c = p;
    const int64_t group = c->per_task, hd = c->hd;
    const int64_t i = task / (c->heads / group), h0 = task % (c->heads / group) * group;
    const int64_t g = h0 / (c->heads / c->n_kv);
    const int64_t nk = c->pos[i] + 1 < c->t ? c->pos[i] + 1 : c->t; /* keys 0..pos */
    const float *k = c->k + g * c->sk_head, *v = c->v + g * c->sv_head;
    if (!c->table) {
        k += i * c->sk_seq;
        v += i * c->sv_seq;
    }
    const float scale = 1.0f / sqrtf((float)hd);

    float stack_scores[2048];
    float *all = nk * group <= 2048 ? stack_scores : malloc((size_t)(nk * group + 8) * sizeof(float));
    if (!all) { /* out of memory: make the failure visible rather than wrong */
        for (int64_t e = 0; e < group * hd; e++)
            c->out[(i * c->heads + h0) * hd + e] = NAN;
        return;
    }

    /* scores of every head of the group, 8 keys at a time */
    int64_t j = 0;
    for (int64_t len; j < nk; j += len) {
        const float *kr = kv_run(c, k, i, j, nk, &len);
        int64_t u = 0;
        if (hd % 8 == 0) {
            for (; u + 8 <= len; u += 8) {
                for (int64_t h = 0; h < group; h++) {
                    const float *q = c->q + (i * c->heads + h0 + h) * hd;
                    __m256 acc[8];
                    for (int x = 0; x < 8; x++)
                        acc[x] = _mm256_setzero_ps();
                    for (int64_t e = 0; e < hd; e += 8) {
                        const __m256 qv = _mm256_loadu_ps(q + e);
                        for (int x = 0; x < 8; x++)
                            acc[x] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr + (u + x) * hd + e), acc[x]);
                    }
                    _mm256_storeu_ps(all + h * nk + j + u, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
                }
            }
        }
        for (; u < len; u++) {
            for (int64_t h = 0; h < group; h++) {
                const float *q = c->q + (i * c->heads + h0 + h) * hd;
                float s = 0.0f;
                for (int64_t e = 0; e < hd; e++)
                    s += q[e] * kr[u * hd + e];
                all[h * nk + j + u] = s * scale;
            }
        }
    }
    for (int64_t h = 0; h < group; h++) {
        float *scores = all + h * nk;
        float *o = c->out + (i * c->heads + h0 + h) * hd;
        /* softmax */
        float mx = -INFINITY;
        for (j = 0; j < nk; j++)
            mx = scores[j] > mx ? scores[j] : mx;
        const __m256 mxv = _mm256_set1_ps(mx);
        __m256 sumv = _mm256_setzero_ps();
        for (j = 0; j + 8 <= nk; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mxv));
            _mm256_storeu_ps(scores + j, e);
            sumv = _mm256_add_ps(sumv, e);
        }
        float sum = hsum8(sumv);
        if (j < nk) { /* tail through the same exp, padded */
            float tmp[8] = {0};
            for (int64_t u = j; u < nk; u++)
                tmp[u - j] = scores[u] - mx;
            const __m256 e = exp8(_mm256_loadu_ps(tmp));
            _mm256_storeu_ps(tmp, e);
            for (int64_t u = j; u < nk; u++) {
                scores[u] = tmp[u - j];
                sum += tmp[u - j];
            }
        }
        const float inv = 1.0f / sum;
        /* weighted sum of values: 64 columns at a time, then the rest */
        if (hd % 8 == 0) {
            int64_t e0 = 0;
            for (; e0 + 64 <= hd; e0 += 64)
                pv_cols(c, v, i, scores, nk, e0, 8, inv, o);
            switch ((hd - e0) / 8) {
            case 1: pv_cols(c, v, i, scores, nk, e0, 1, inv, o); break;
            case 2: pv_cols(c, v, i, scores, nk, e0, 2, inv, o); break;
            case 3: pv_cols(c, v, i, scores, nk, e0, 3, inv, o); break;
            case 4: pv_cols(c, v, i, scores, nk, e0, 4, inv, o); break;
            case 5: pv_cols(c, v, i, scores, nk, e0, 5, inv, o); break;
            case 6: pv_cols(c, v, i, scores, nk, e0, 6, inv, o); break;
            case 7: pv_cols(c, v, i, scores, nk, e0, 7, inv, o); break;
            default: break;
            }
        } else {
            for (int64_t e = 0; e < hd; e++)
                o[e] = 0.0f;
            for (int64_t len, j0 = 0; j0 < nk; j0 += len) {
                const float *vr = kv_run(c, v, i, j0, nk, &len);
                for (int64_t u = 0; u < len; u++)
                    for (int64_t e = 0; e < hd; e++)
                        o[e] += scores[j0 + u] * vr[u * hd + e];
            }
            for (int64_t e = 0; e < hd; e++)
                o[e] *= inv;
        }
    }
    if (all != stack_scores)
        free(all);
}

/* Tasks of a kv head's whole group of query heads (a task per query head read the keys and
 * values from L2 again for each: prefill attention ran ~2x slower), unless that leaves fewer
 * than two tasks a thread (one-token decode of a model with few kv heads): then one a head. */
static void attn_run(AttnCtx *c, int64_t work, int nthreads)
{
    const int64_t group = c->heads / c->n_kv;
    c->per_task = c->n * c->n_kv >= 2 * (int64_t)nthreads ? group : 1;
    ops_parallel_for(c->n * c->heads / c->per_task, work >= (1 << 16) ? nthreads : 1, attn_task, c);
}

void ops_attention(const float *q, const float *k, int64_t sk_head, const float *v, int64_t sv_head,
                   const int64_t *pos, int64_t n, int64_t heads, int64_t n_kv, int64_t t, int64_t hd,
                   float *out, int nthreads)
{
    AttnCtx c = {q, k, v, 0, 0, sk_head, sv_head, pos, n, heads, n_kv, t, hd, out, NULL, 0, 0, 1};
    attn_run(&c, n * heads * t * hd, nthreads);
}

/* B sequences decoding one token each: query row b reads sequence b's keys 0..lengths[b]-1.
 * The same task as above, so a row's result does not depend on its batch mates. */
void ops_decode_attention(const float *q, const float *k, int64_t sk_seq, int64_t sk_head, const float *v,
                          int64_t sv_seq, int64_t sv_head, const int64_t *last, int64_t b, int64_t heads,
                          int64_t n_kv, int64_t t, int64_t hd, float *out, int nthreads)
{
    AttnCtx c = {q, k, v, sk_seq, sv_seq, sk_head, sv_head, last, b, heads, n_kv, t, hd, out, NULL, 0, 0, 1};
    attn_run(&c, b * heads * t * hd, nthreads);
}

/* The same through block tables, reading the paged arena in place (no gather copy):
 * k, v one layer of the arena (n_kv, blocks, block, hd) contiguous, `block` a multiple of 8;
 * query row b reads the blocks table[b * nb .. b * nb + nb - 1], keys 0..last[b]. */
void ops_paged_decode_attention(const float *q, const float *k, const float *v, int64_t blocks, int64_t block,
                                const int64_t *table, int64_t nb, const int64_t *last, int64_t b, int64_t heads,
                                int64_t n_kv, int64_t hd, float *out, int nthreads)
{
    const int64_t s_head = blocks * block * hd;
    AttnCtx c = {q, k, v, 0, 0, s_head, s_head, last, b, heads, n_kv, nb * block, hd, out, table, nb, block, 1};
    int64_t work = 0;
    for (int64_t i = 0; i < b; i++)
        work += (last[i] + 1) * heads * hd;
    attn_run(&c, work, nthreads);
}

#endif /* x86-64 */
