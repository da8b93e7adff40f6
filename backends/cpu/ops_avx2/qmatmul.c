/* Quantized matrix products out = x @ W.T with W in GGML blocks, AVX2 + FMA + F16C.
 *
 * As llama.cpp does: each activation row is quantized per 32-block to int8 with one
 * scale (ops_quantize_act), then every (weight block, activation block) pair is an
 * integer dot product -- _mm256_maddubs_epi16 (u8 x s8 -> pairs summed in s16) and
 * _mm256_madd_epi16 (-> s32) -- scaled in float by d_w * d_x and accumulated.
 *
 * Q4_0, Q4_1 and Q8_0 are read in the x8 layout (ops_avx2.h, repacked at load): 8 weight
 * rows per register, one output row per lane. Q4_K and Q6_K are read in the file's order,
 * one row at a time. Every kernel computes its rows against up to C = 4 activation rows at
 * once, so a weight block is loaded and unpacked once per 4 tokens of a small batch.
 * Threads (threadpool.c) take tiles of ROW_TILE output rows from a shared counter; each
 * writes its own outputs, no reduction, so results depend neither on the thread count nor
 * on a row's batch mates.
 *
 * The kernel files (this one, dequant.c, ops.c) are compiled for AVX2 by the pragma below,
 * module.c for the baseline, so the module imports on any x86-64 and the Python layer
 * asks have_avx2() first.
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ops_avx2.h"
#include "simd.h"

/* ---- activation quantization (llama.cpp's AVX2 quantize_row_q8_1: Q8_0's rounding, plus
 * the block sum, kept in float32 where Q8_1 rounds it to fp16) ---- */

static void quantize_act_row(const float *x, int64_t nb, int8_t *q, float *d, float *s, int32_t *isum)
{
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < nb; b++) {
        __m256 v0 = _mm256_loadu_ps(x + 32 * b);
        __m256 v1 = _mm256_loadu_ps(x + 32 * b + 8);
        __m256 v2 = _mm256_loadu_ps(x + 32 * b + 16);
        __m256 v3 = _mm256_loadu_ps(x + 32 * b + 24);
        __m256 amax = _mm256_andnot_ps(sign_bit, v0);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v1));
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v2));
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v3));
        const float max_scalar = hmax8(amax);
        const float dd = max_scalar / 127.f;
        const float id = max_scalar != 0.0f ? 127.f / max_scalar : 0.0f;
        const __m256 mul = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const int32_t sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        /* pack 4 x 8 int32 -> 32 int8; packs work per 128-bit lane, the permute restores the order */
        i0 = _mm256_packs_epi32(i0, i1);
        i2 = _mm256_packs_epi32(i2, i3);
        i0 = _mm256_packs_epi16(i0, i2);
        i0 = _mm256_permutevar8x32_epi32(i0, perm);
        _mm256_storeu_si256((__m256i *)(q + 32 * b), i0);
        d[b] = fp16_round(dd);
        s[b] = d[b] * (float)sum;
        isum[b] = sum;
    }
}

typedef struct {
    const float *x;
    int64_t ldx;
    QAct *a;
} QuantizeCtx;

static void quantize_task(void *p, int64_t i)
{
    const QuantizeCtx *c = p;
    QAct *a = c->a;
    const int64_t nb = a->nb, k = a->k;
    quantize_act_row(c->x + i * c->ldx, nb, a->q + i * k, a->d + i * nb, a->s + i * nb, a->isum + i * nb);
}

void ops_quantize_act(const float *x, int64_t ldx, QAct *a, int nthreads)
{
    QuantizeCtx c = {x, ldx, a};
    ops_parallel_for(a->n, a->n * a->k >= (1 << 16) ? nthreads : 1, quantize_task, &c);
}

#define MAXC 4 /* activation rows per tile */
#ifndef PF_ROWS
#define PF_ROWS 4 /* K-quant row kernels: prefetch the same super-block this many rows on */
#endif
#ifndef PF_GROUPS
#define PF_GROUPS 8 /* x8 kernels: prefetch the same record this many 8-row groups on */
#endif

/* ---- Q4_K: 256-weight super-blocks, 8 sub-blocks of 32 with 6-bit scales and mins ----
 * w = (d * sc_s) * q - (dmin * mn_s); the min term uses the exact integer sum of the
 * activation block: sum_l mn * x_l = mn * d_x * isum. */

static inline void q4k_scales(const uint8_t *p, uint8_t sc[8], uint8_t mn[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = p[j] & 63;
        mn[j] = p[j + 4] & 63;
        sc[j + 4] = (p[j + 8] & 0x0F) | ((p[j] >> 6) << 4);
        mn[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
    }
}

static inline __attribute__((always_inline)) void tile_q4_k(
    const int C, const uint8_t *w, int64_t rb, int64_t nb, const QAct *a, int64_t c0, float *out, int64_t ldo)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[MAXC];
    float msum[MAXC];
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) {
        acc[c] = _mm256_setzero_ps();
        msum[c] = 0.0f;
    }
    const int8_t *yq = a->q + c0 * a->k;
    const float *yd = a->d + c0 * nb;
    const int32_t *yi = a->isum + c0 * nb;
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * 144;
        for (int off = 0; off < 144; off += 64)
            _mm_prefetch((const char *)(blk + PF_ROWS * rb + off), _MM_HINT_T0);
        const float d = f16_load(blk), dmin = f16_load(blk + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(blk + 4, sc, mn);
        for (int s = 0; s < 8; s++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (s >> 1)));
            const __m256i q = (s & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4) : _mm256_and_si256(raw, m4);
            const int64_t b = sb * 8 + s;
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(yq + c * a->k + b * QK));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones));
                const float dy = yd[c * nb + b];
                acc[c] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * (float)sc[s] * dy), acc[c]);
                msum[c] += dmin * (float)mn[s] * dy * (float)yi[c * nb + b];
            }
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < C; c++)
        out[(c0 + c) * ldo] = hsum8(acc[c]) - msum[c];
}

/* ---- Q6_K: 256-weight super-blocks, 16 sub-blocks of 16 with int8 scales ----
 * w = (d * sc_s) * (q - 32), q 6-bit: (q - 32) * y = q * y - 32 * y, both through
 * maddubs in s16 (|result| <= 2 * 32 * 127); the two sub-block scales of an activation
 * block then weight the s16 pairs in one madd. */

static inline __attribute__((always_inline)) void tile_q6_k(
    const int C, const uint8_t *w, int64_t rb, int64_t nb, const QAct *a, int64_t c0, float *out, int64_t ldo)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i m2 = _mm256_set1_epi8(3);
    const __m256i m32 = _mm256_set1_epi8(32);
    __m256 acc[MAXC];
#pragma GCC unroll 4
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    const int8_t *yq = a->q + c0 * a->k;
    const float *yd = a->d + c0 * nb;
    for (int64_t sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * 210;
        for (int off = 0; off < 210; off += 64)
            _mm_prefetch((const char *)(blk + PF_ROWS * rb + off), _MM_HINT_T0);
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *scales = (const int8_t *)(blk + 192);
        const float d = f16_load(blk + 208);
        for (int j8 = 0; j8 < 8; j8++) { /* activation block = 128 h + 32 j */
            const int h = j8 >> 2, j = j8 & 3;
            const __m256i lraw = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (j & 1)));
            const __m256i lo = j < 2 ? _mm256_and_si256(lraw, m4) : _mm256_and_si256(_mm256_srli_epi16(lraw, 4), m4);
            const __m256i hraw = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(hraw, _mm_cvtsi32_si128(2 * j)), m2);
            const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
            const __m256i sc = _mm256_set_m128i(_mm_set1_epi16(scales[2 * j8 + 1]), _mm_set1_epi16(scales[2 * j8]));
            const int64_t b = sb * 8 + j8;
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(yq + c * a->k + b * QK));
                const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), _mm256_maddubs_epi16(m32, y));
                const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, sc));
                acc[c] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * yd[c * nb + b]), acc[c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < C; c++)
        out[(c0 + c) * ldo] = hsum8(acc[c]);
}

/* ---- instantiations: one function per (type, R, C), chosen by a switch ---- */

#define KQUANT(TILE, NAME)                                                                                  \
    static void NAME##_rows(const uint8_t *w, int64_t rb, int64_t rows, int64_t nb, const QAct *a, float *out, int64_t ldo) \
    {                                                                                                       \
        for (int64_t c0 = 0; c0 < a->n; c0 += MAXC) {                                                       \
            const int64_t cn = a->n - c0 < MAXC ? a->n - c0 : MAXC;                                         \
            for (int64_t r = 0; r < rows; r++) {                                                            \
                const uint8_t *wr = w + r * rb;                                                             \
                if (cn == 1) TILE(1, wr, rb, nb, a, c0, out + r, ldo);                                          \
                else if (cn == 2) TILE(2, wr, rb, nb, a, c0, out + r, ldo);                                     \
                else if (cn == 3) TILE(3, wr, rb, nb, a, c0, out + r, ldo);                                     \
                else TILE(4, wr, rb, nb, a, c0, out + r, ldo);                                                  \
            }                                                                                               \
        }                                                                                                   \
    }

KQUANT(tile_q4_k, q4_k)
KQUANT(tile_q6_k, q6_k)

/* ---- x8 layout (ops_avx2.h): 8 weight rows per register, lanes = rows ----
 *
 * A 32-byte chunk holds 4 consecutive weights of each of 8 rows; the activation's matching
 * 4 bytes are broadcast to every lane, so maddubs + madd leave one partial dot product per
 * row in each 32-bit lane: no horizontal sums, and the 8 rows' scales come as one fp16x8
 * load. Per block and 8 rows: ~45 instructions for 256 multiply-adds (the row kernels above
 * need ~17 per 32). Q4 sums its 8 chunks in s16 before one madd (8 * 2 * 15 * 127 < 32767);
 * Q4_0 uses the unsigned nibbles and subtracts 8 * sum(y); Q8_0 takes the sign trick and a
 * madd per chunk. */

static inline __m256i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static inline __attribute__((always_inline)) void tile_x8(
    const int T, const int C, const uint8_t *g, int64_t nb, int64_t gstride, const QAct *a, int64_t c0,
    float *out, int64_t ldo, int valid)
{
    const int64_t rs = x8_record(T);
    const int64_t qs_off = T == QT_Q4_1 ? 32 : 16;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MAXC];
#pragma GCC unroll 4
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    const int8_t *yq = a->q + c0 * a->k;
    const float *yd = a->d + c0 * nb;
    const float *ys = a->s + c0 * nb;
    const int32_t *yi = a->isum + c0 * nb;

    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *rec = g + b * rs;
        /* the same record PF_GROUPS groups on: every line of it (144..272 bytes) */
#pragma GCC unroll 5
        for (int64_t off = 0; off < rs; off += 64)
            _mm_prefetch((const char *)(rec + PF_GROUPS * gstride + off), _MM_HINT_T0);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)rec));
        __m256 mw = _mm256_setzero_ps();
        if (T == QT_Q4_1)
            mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 16)));
        const uint8_t *qs = rec + qs_off;
        __m256i w[8];
        if (T != QT_Q8_0) {
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                w[c] = _mm256_and_si256(raw, m4);
                w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < C; j++) {
            const int8_t *y = yq + j * a->k + b * QK;
            __m256i p;
            if (T != QT_Q8_0) {
                /* weight chunk c < 4 pairs with y[4c..], chunk c + 4 with y[16 + 4c..] */
                __m256i s16 = _mm256_maddubs_epi16(w[0], bcast4(y));
#pragma GCC unroll 8
                for (int c = 1; c < 8; c++)
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[c], bcast4(y + (c < 4 ? 4 * c : 16 + 4 * (c - 4)))));
                p = _mm256_madd_epi16(s16, ones);
                if (T == QT_Q4_0)
                    p = _mm256_sub_epi32(p, _mm256_set1_epi32(8 * yi[j * nb + b]));
            } else {
                p = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int c = 0; c < 8; c++) {
                    const __m256i wc = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wc, wc), _mm256_sign_epi8(bcast4(y + 4 * c), wc));
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(p16, ones));
                }
            }
            const __m256 dy = _mm256_broadcast_ss(yd + j * nb + b);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dy), acc[j]);
            if (T == QT_Q4_1)
                acc[j] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(ys + j * nb + b), acc[j]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < C; j++) {
        if (valid == X8) {
            _mm256_storeu_ps(out + (c0 + j) * ldo, acc[j]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[j]);
            memcpy(out + (c0 + j) * ldo, tmp, (size_t)valid * sizeof(float));
        }
    }
}

#define X8_KERNEL(T, NAME)                                                                                  \
    static void NAME##_c1(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 1, g, nb, gs, a, c0, o, l, v); } \
    static void NAME##_c2(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 2, g, nb, gs, a, c0, o, l, v); } \
    static void NAME##_c3(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 3, g, nb, gs, a, c0, o, l, v); } \
    static void NAME##_c4(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 4, g, nb, gs, a, c0, o, l, v); } \
    /* rows r0..r0+nr-1 of an x8 part, r0 a multiple of 8 */                                                \
    static void NAME##_rows(const uint8_t *data, int64_t r0, int64_t nr, int64_t nb, const QAct *a, float *out, int64_t ldo) \
    {                                                                                                       \
        const int64_t gs = nb * x8_record(T);                                                               \
        for (int64_t r = 0; r < nr; r += X8) {                                                              \
            const uint8_t *g = data + (r0 + r) / X8 * gs;                                                   \
            const int v = nr - r < X8 ? (int)(nr - r) : X8;                                                 \
            for (int64_t c0 = 0; c0 < a->n; c0 += MAXC) {                                                   \
                const int64_t cn = a->n - c0 < MAXC ? a->n - c0 : MAXC;                                     \
                if (cn == 1) NAME##_c1(g, nb, gs, a, c0, out + r, ldo, v);                                  \
                else if (cn == 2) NAME##_c2(g, nb, gs, a, c0, out + r, ldo, v);                             \
                else if (cn == 3) NAME##_c3(g, nb, gs, a, c0, out + r, ldo, v);                             \
                else NAME##_c4(g, nb, gs, a, c0, out + r, ldo, v);                                          \
            }                                                                                               \
        }                                                                                                   \
    }

X8_KERNEL(QT_Q4_0, x8_q4_0)
X8_KERNEL(QT_Q4_1, x8_q4_1)
X8_KERNEL(QT_Q8_0, x8_q8_0)

/* Rows per work item: long enough runs of rows for each thread's prefetch stream (16-row
 * items measured 3-10 % slower at decode), small enough to split a 192-row matrix. */
#ifndef ROW_TILE
#define ROW_TILE 64
#endif

typedef struct {
    const QMatrix *w;
    const QAct *a;
    float *out;
    int64_t ldo;
    int64_t first_tile[9]; /* of each part, then the total */
    int64_t first_col[8];  /* output column of each part */
} MatmulCtx;

static void matmul_task(void *ctx, int64_t t)
{
    const MatmulCtx *c = ctx;
    const QMatrix *w = c->w;
    const QAct *a = c->a;
    const int64_t nb = a->nb, ldo = c->ldo;
    int p = 0;
    while (t >= c->first_tile[p + 1])
        p++;
    const QPart *part = &w->parts[p];
    const int64_t r0 = (t - c->first_tile[p]) * ROW_TILE;
    const int64_t nr = part->rows - r0 < ROW_TILE ? part->rows - r0 : ROW_TILE;
    const uint8_t *wd = part->data + r0 * part->row_bytes;
    float *o = c->out + c->first_col[p] + r0;
    if (part->x8) {
        switch (part->qtype) {
        case QT_Q4_0: x8_q4_0_rows(part->data, r0, nr, nb, a, o, ldo); break;
        case QT_Q4_1: x8_q4_1_rows(part->data, r0, nr, nb, a, o, ldo); break;
        case QT_Q8_0: x8_q8_0_rows(part->data, r0, nr, nb, a, o, ldo); break;
        default: break;
        }
        return;
    }
    switch (part->qtype) {
    case QT_Q4_K: q4_k_rows(wd, part->row_bytes, nr, nb, a, o, ldo); break;
    case QT_Q6_K: q6_k_rows(wd, part->row_bytes, nr, nb, a, o, ldo); break;
    default: break; /* rejected when the matrix was built */
    }
}

void ops_matmul(const QMatrix *w, const QAct *a, float *out, int64_t ldo, int nthreads)
{
    MatmulCtx c = {.w = w, .a = a, .out = out, .ldo = ldo};
    int64_t ntiles = 0, col = 0;
    for (int p = 0; p < w->nparts; p++) {
        c.first_tile[p] = ntiles;
        c.first_col[p] = col;
        ntiles += (w->parts[p].rows + ROW_TILE - 1) / ROW_TILE;
        col += w->parts[p].rows;
    }
    c.first_tile[w->nparts] = ntiles;
    /* below ~32k multiply-adds a second thread costs more than it saves */
    ops_parallel_for(ntiles, a->n * w->rows * w->k >= (1 << 15) ? nthreads : 1, matmul_task, &c);
}

#endif /* x86-64 */
