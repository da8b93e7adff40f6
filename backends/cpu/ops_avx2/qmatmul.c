/* Quantized matrix products out = x @ W.T with W in GGML blocks, AVX2 + FMA + F16C.
 *
 * As llama.cpp does: each activation row is quantized per 32-block to int8 with one
 * scale (ops_quantize_act), then every (weight block, activation block) pair is an
 * integer dot product -- _mm256_maddubs_epi16 (u8 x s8 -> pairs summed in s16) and
 * _mm256_madd_epi16 (-> s32) -- scaled in float by d_w * d_x and accumulated.
 *
 * Every block type is read in the x8 layout (x8.h, repacked at load): 8 weight rows per
 * register, one output row per lane, one kernel (tile_x8) instantiated per type. It computes
 * its rows against up to C = 4 activation rows at once, so a weight block is loaded and
 * unpacked once per 4 tokens of a small batch.
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
#include "x8.h"

/* ---- activation quantization (llama.cpp's AVX2 quantize_row_q8_1: Q8_0's rounding, plus
 * the block sum, kept in float32 where Q8_1 rounds it to fp16) ---- */

static void quantize_act_row(const float *x, int64_t nb, int8_t *q, float *d, float *s, int32_t *isum, int32_t *isum16)
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
        const int32_t sum16 = hsum_i32(_mm256_add_epi32(i0, i1));
        const int32_t sum = sum16 + hsum_i32(_mm256_add_epi32(i2, i3));
        /* pack 4 x 8 int32 -> 32 int8; packs work per 128-bit lane, the permute restores the order */
        i0 = _mm256_packs_epi32(i0, i1);
        i2 = _mm256_packs_epi32(i2, i3);
        i0 = _mm256_packs_epi16(i0, i2);
        i0 = _mm256_permutevar8x32_epi32(i0, perm);
        _mm256_storeu_si256((__m256i *)(q + 32 * b), i0);
        d[b] = fp16_round(dd);
        s[b] = d[b] * (float)sum;
        isum[b] = sum;
        isum16[b] = sum16;
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
    quantize_act_row(c->x + i * c->ldx, nb, a->q + i * k, a->d + i * nb, a->s + i * nb, a->isum + i * nb, a->isum16 + i * nb);
}

void ops_quantize_act(const float *x, int64_t ldx, QAct *a, int nthreads)
{
    QuantizeCtx c = {x, ldx, a};
    ops_parallel_for(a->n, a->n * a->k >= (1 << 16) ? nthreads : 1, quantize_task, &c);
}

#define MAXC 4 /* activation rows per tile */
#ifndef PF_GROUPS
#define PF_GROUPS 8 /* prefetch the same record this many 8-row groups on */
#endif

/* ---- the x8 kernel: 8 weight rows per register, lanes = rows, every block type ----
 *
 * x8_unpack (x8.h) gives chunk c = weights 4c..4c+3 of each of the 8 rows; the activation's
 * matching 4 bytes are broadcast to every lane, so maddubs + madd leave one partial dot
 * product per row in each 32-bit lane: no horizontal sums, the 8 rows' scales are one
 * vector. For each activation row y and 32-block (dy its scale, S = sum(y), S0 and S1 the
 * sums of its halves):
 *
 *   P  = sum_c sc[h(c)] * (q_c . y_c)   in int32: chunks summed in s16 (as many as cannot
 *                                        overflow: 8 at 4 bits, 4 at 5, 2 at 6), then one
 *                                        madd with the sub-block scale pair (or ones)
 *   P -= OFF * (sc0 * S0 + sc1 * S1)     the weights' offset, exact (one madd)
 *   acc += d * dy * P  (+ m * dy * S  |  - dmin * dy * (mn0 * S0 + mn1 * S1))
 *
 * Signed types (Q8_0, IQ4_*) take |q| . sign(y, q), a madd per chunk. Per block and 8 rows
 * this is ~40 instructions for 256 multiply-adds against ~17 per 32 for one row at a time. */

static inline __m256i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* int32 lanes (a, b) -> int16 pairs (a, b) for madd */
static inline __m256i pair16(__m256i a, __m256i b)
{
    return _mm256_blend_epi16(a, _mm256_slli_epi32(b, 16), 0xAA);
}

/* One activation tile: C rows' accumulators, their quantized blocks and sums. */
typedef struct {
    __m256 acc[MAXC];
    const int8_t *yq;
    const float *yd, *ys;
    const int32_t *yi, *yh;
    int64_t k, nb;
} Tile;

/* 32-block b (block s of record rec) of the 8 rows against the tile's C activation rows */
static inline __attribute__((always_inline)) void block_x8(const int T, const int C, const uint8_t *rec, const int s,
                                                            int64_t b, Tile *t)
{
    const int G = X8_BITS(T) <= 4 && !X8_HALVES(T) ? 8 : X8_BITS(T) == 6 ? 2 : 4; /* chunks summed in s16 */
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nb = t->nb;
    X8Block x;
    x8_unpack(T, rec, s, &x);
    const __m256i sp[2] = {X8_SCALED(T) ? pair16(x.sc[0], x.sc[0]) : ones, X8_SCALED(T) ? pair16(x.sc[1], x.sc[1]) : ones};
    const __m256i sc01 = pair16(x.sc[0], x.sc[1]), mn01 = pair16(x.mn[0], x.mn[1]);
    __m256 dmn = _mm256_setzero_ps(); /* Q4_K/Q5_K: dmin * mn, one min for the block */
    if (X8_SUB_MIN(T) && !X8_HALVES(T))
        dmn = _mm256_mul_ps(x.m, _mm256_cvtepi32_ps(x.mn[0]));
    __m256i aq[8];
    if (X8_SIGNED(T))
        for (int c = 0; c < 8; c++)
            aq[c] = _mm256_sign_epi8(x.q[c], x.q[c]);
#pragma GCC unroll 4
    for (int j = 0; j < C; j++) {
        const int8_t *y = t->yq + j * t->k + b * QK;
        __m256i p = _mm256_setzero_si256();
        if (X8_SIGNED(T)) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++)
                p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_maddubs_epi16(aq[c], _mm256_sign_epi8(bcast4(y + 4 * c), x.q[c])), sp[0]));
        } else {
#pragma GCC unroll 8
            for (int c0g = 0; c0g < 8; c0g += G) {
                __m256i s16 = _mm256_maddubs_epi16(x.q[c0g], bcast4(y + 4 * c0g));
#pragma GCC unroll 8
                for (int c = c0g + 1; c < c0g + G; c++)
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(x.q[c], bcast4(y + 4 * c)));
                p = _mm256_add_epi32(p, _mm256_madd_epi16(s16, sp[c0g >> 2]));
            }
        }
        const int32_t S = t->yi[j * nb + b], S0 = t->yh[j * nb + b];
        const __m256i s01 = _mm256_set1_epi32((int32_t)(((uint32_t)(S - S0) << 16) | ((uint32_t)S0 & 0xFFFF)));
        if (X8_OFF(T) && !X8_HALVES(T))
            p = _mm256_sub_epi32(p, _mm256_set1_epi32(X8_OFF(T) * S));
        else if (X8_OFF(T))
            p = _mm256_sub_epi32(p, _mm256_slli_epi32(_mm256_madd_epi16(sc01, s01), __builtin_ctz(X8_OFF(T))));
        const __m256 dy = _mm256_broadcast_ss(t->yd + j * nb + b);
        t->acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(x.d, dy), t->acc[j]);
        if (X8_ADD_M(T))
            t->acc[j] = _mm256_fmadd_ps(x.m, _mm256_broadcast_ss(t->ys + j * nb + b), t->acc[j]);
        else if (X8_SUB_MIN(T) && X8_HALVES(T))
            t->acc[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mn01, s01)), _mm256_mul_ps(x.m, dy), t->acc[j]);
        else if (X8_SUB_MIN(T))
            t->acc[j] = _mm256_fnmadd_ps(dmn, _mm256_broadcast_ss(t->ys + j * nb + b), t->acc[j]);
    }
}

static inline __attribute__((always_inline)) void tile_x8(
    const int T, const int C, const uint8_t *g, int64_t nb, int64_t gstride, const QAct *a, int64_t c0,
    float *out, int64_t ldo, int valid)
{
    const int64_t rs = x8_record(T);
    Tile t = {.yq = a->q + c0 * a->k, .yd = a->d + c0 * nb, .ys = a->s + c0 * nb, .yi = a->isum + c0 * nb,
              .yh = a->isum16 + c0 * nb, .k = a->k, .nb = nb};
#pragma GCC unroll 4
    for (int c = 0; c < C; c++)
        t.acc[c] = _mm256_setzero_ps();
    if (X8_SUPER(T)) {
        for (int64_t sb = 0; sb < nb / 8; sb++) {
            const uint8_t *rec = g + sb * rs;
            /* the same record PF_GROUPS groups on: every line of it */
            for (int64_t off = 0; off < rs; off += 64)
                _mm_prefetch((const char *)(rec + PF_GROUPS * gstride + off), _MM_HINT_T0);
            /* the 8 blocks spelled out: each with its s a constant, shifts and offsets fold */
            block_x8(T, C, rec, 0, 8 * sb + 0, &t);
            block_x8(T, C, rec, 1, 8 * sb + 1, &t);
            block_x8(T, C, rec, 2, 8 * sb + 2, &t);
            block_x8(T, C, rec, 3, 8 * sb + 3, &t);
            block_x8(T, C, rec, 4, 8 * sb + 4, &t);
            block_x8(T, C, rec, 5, 8 * sb + 5, &t);
            block_x8(T, C, rec, 6, 8 * sb + 6, &t);
            block_x8(T, C, rec, 7, 8 * sb + 7, &t);
        }
    } else {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *rec = g + b * rs;
#pragma GCC unroll 5
            for (int64_t off = 0; off < rs; off += 64)
                _mm_prefetch((const char *)(rec + PF_GROUPS * gstride + off), _MM_HINT_T0);
            block_x8(T, C, rec, 0, b, &t);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < C; j++) {
        if (valid == X8) {
            _mm256_storeu_ps(out + (c0 + j) * ldo, t.acc[j]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, t.acc[j]);
            memcpy(out + (c0 + j) * ldo, tmp, (size_t)valid * sizeof(float));
        }
    }
}

#define X8_KERNEL(T, NAME)                                                                                  \
    static void NAME##_c1(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 1, g, nb, gs, a, c0, o, l, v); } \
    static void NAME##_c2(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 2, g, nb, gs, a, c0, o, l, v); } \
    static void NAME##_c3(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 3, g, nb, gs, a, c0, o, l, v); } \
    static void NAME##_c4(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) { tile_x8(T, 4, g, nb, gs, a, c0, o, l, v); } \
    /* rows r0..r0+nr-1 of an x8 part, r0 a multiple of 8; nb 32-blocks a row */                          \
    static void NAME##_rows(const uint8_t *data, int64_t r0, int64_t nr, int64_t nb, const QAct *a, float *out, int64_t ldo) \
    {                                                                                                       \
        const int64_t gs = nb * QK / qformat(T)->block * x8_record(T);                                      \
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
X8_KERNEL(QT_Q5_0, x8_q5_0)
X8_KERNEL(QT_Q5_1, x8_q5_1)
X8_KERNEL(QT_Q8_0, x8_q8_0)
X8_KERNEL(QT_Q2_K, x8_q2_k)
X8_KERNEL(QT_Q3_K, x8_q3_k)
X8_KERNEL(QT_Q4_K, x8_q4_k)
X8_KERNEL(QT_Q5_K, x8_q5_k)
X8_KERNEL(QT_Q6_K, x8_q6_k)
X8_KERNEL(QT_IQ4_NL, x8_iq4_nl)
X8_KERNEL(QT_IQ4_XS, x8_iq4_xs)

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
    float *o = c->out + c->first_col[p] + r0;
    switch (part->qtype) {
    case QT_Q4_0: x8_q4_0_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q4_1: x8_q4_1_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q5_0: x8_q5_0_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q5_1: x8_q5_1_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q8_0: x8_q8_0_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q2_K: x8_q2_k_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q3_K: x8_q3_k_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q4_K: x8_q4_k_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q5_K: x8_q5_k_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_Q6_K: x8_q6_k_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_IQ4_NL: x8_iq4_nl_rows(part->data, r0, nr, nb, a, o, ldo); break;
    case QT_IQ4_XS: x8_iq4_xs_rows(part->data, r0, nr, nb, a, o, ldo); break;
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
