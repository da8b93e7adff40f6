/* Block formats <-> float32, AVX2: the x8 repacking, the dequantize-into-GEMM path and Q8_0
 * requantization.
 *
 * Dequantization is bit-identical to backends/quants.py (and so to gguf-py): the
 * same float32 products in the same order, no FMA contraction (`q * d + m` is a
 * multiply, then an add). It reads the x8 layout through x8_unpack, as the kernels do.
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ops_avx2.h"
#include "simd.h"
#include "x8.h"

/* ---- the x8 layout (x8.h): repacking, and reading rows back as float32 ---- */

int ops_x8_supported(int qtype)
{
    return qformat(qtype) != NULL;
}

int64_t ops_x8_bytes(int qtype, int64_t rows, int64_t k)
{
    const QFormat *f = qformat(qtype);
    return (rows + X8 - 1) / X8 * X8 * (k / f->block) * f->size;
}

typedef struct {
    int qtype;
    const uint8_t *src;
    int64_t rows, k;
    uint8_t *dst;
} RepackCtx;

/* group g: the unit at file offset o of row r goes to record offset 8 * o + r * unit */
static void repack_task(void *p, int64_t g)
{
    const RepackCtx *c = p;
    const QFormat *f = qformat(c->qtype);
    const int64_t nb = c->k / f->block, rs = x8_record(c->qtype);
    uint8_t *group = c->dst + g * nb * rs;
    memset(group, 0, (size_t)(nb * rs)); /* padding rows: zero scales and weights */
    for (int r = 0; r < X8 && g * X8 + r < c->rows; r++) {
        const uint8_t *row = c->src + (g * X8 + r) * nb * f->size;
        for (int64_t b = 0; b < nb; b++)
            for (int o = 0, u; o < f->size; o += u) {
                u = x8_unit(f, o);
                memcpy(group + b * rs + 8 * o + r * u, row + b * f->size + o, (size_t)u);
            }
    }
}

void ops_repack_x8(int qtype, const uint8_t *src, int64_t rows, int64_t k, uint8_t *dst, int nthreads)
{
    RepackCtx c = {qtype, src, rows, k, dst};
    ops_parallel_for((rows + X8 - 1) / X8, nthreads, repack_task, &c);
}

/* 32-block b of the 8 rows of a group as float32, out[r * 32 + i], bit-identical to
 * backends/quants.py: w = float(q - OFF) * (d * sc), then + m or - (dmin * mn) (a
 * multiply, then an add: no FMA). */
static inline __attribute__((always_inline)) void dequant_block_x8(const int T, const uint8_t *g, int64_t b, float out[8 * QK])
{
    X8Block x;
    int s;
    const uint8_t *rec = x8_rec(T, g, b, &s);
    x8_unpack(T, rec, s, &x);
    __m256 A[2], B[2];
    for (int h = 0; h < 2; h++) {
        A[h] = X8_SCALED(T) ? _mm256_mul_ps(x.d, _mm256_cvtepi32_ps(x.sc[h])) : x.d;
        B[h] = X8_SUB_MIN(T) ? _mm256_mul_ps(x.m, _mm256_cvtepi32_ps(x.mn[h])) : x.m;
    }
    for (int c = 0; c < 8; c++) {
        __m256i q = x.q[c];
        if (X8_OFF(T))
            q = _mm256_sub_epi8(q, _mm256_set1_epi8(X8_OFF(T)));
        /* rows 2p and 2p + 1: 8 bytes -> 8 floats, scaled by [A_2p x4 | A_2p+1 x4] */
        const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        const __m128i pairs[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
        for (int p = 0; p < 4; p++) {
            const __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
            const __m256i v = X8_SIGNED(T) || X8_OFF(T) ? _mm256_cvtepi8_epi32(pairs[p]) : _mm256_cvtepu8_epi32(pairs[p]);
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_permutevar8x32_ps(A[c >> 2], idx));
            if (X8_ADD_M(T))
                f = _mm256_add_ps(f, _mm256_permutevar8x32_ps(B[c >> 2], idx));
            else if (X8_SUB_MIN(T))
                f = _mm256_sub_ps(f, _mm256_permutevar8x32_ps(B[c >> 2], idx));
            _mm_storeu_ps(out + 2 * p * QK + 4 * c, _mm256_castps256_ps128(f));
            _mm_storeu_ps(out + (2 * p + 1) * QK + 4 * c, _mm256_extractf128_ps(f, 1));
        }
    }
}

#define DEQUANT_GROUP(T, NAME)                                                                              \
    static void NAME(const uint8_t *g, int64_t k, int r0, int nr, float *out)                            \
    {                                                                                                       \
        float tmp[8 * QK];                                                                                  \
        for (int64_t b = 0; b < k / QK; b++) {                                                              \
            dequant_block_x8(T, g, b, tmp);                                                                 \
            for (int r = 0; r < nr; r++)                                                                    \
                memcpy(out + r * k + QK * b, tmp + (r0 + r) * QK, QK * sizeof(float));                      \
        }                                                                                                   \
    }

DEQUANT_GROUP(QT_Q4_0, dq_q4_0)
DEQUANT_GROUP(QT_Q4_1, dq_q4_1)
DEQUANT_GROUP(QT_Q5_0, dq_q5_0)
DEQUANT_GROUP(QT_Q5_1, dq_q5_1)
DEQUANT_GROUP(QT_Q8_0, dq_q8_0)
DEQUANT_GROUP(QT_Q2_K, dq_q2_k)
DEQUANT_GROUP(QT_Q3_K, dq_q3_k)
DEQUANT_GROUP(QT_Q4_K, dq_q4_k)
DEQUANT_GROUP(QT_Q5_K, dq_q5_k)
DEQUANT_GROUP(QT_Q6_K, dq_q6_k)
DEQUANT_GROUP(QT_IQ4_NL, dq_iq4_nl)
DEQUANT_GROUP(QT_IQ4_XS, dq_iq4_xs)

/* rows r0 .. r0 + nr - 1 (within one group) of the group at g, (nr, k) float32 */
static void dequant_group_rows(int qtype, const uint8_t *g, int64_t k, int r0, int nr, float *out)
{
    switch (qtype) {
    case QT_Q4_0: dq_q4_0(g, k, r0, nr, out); break;
    case QT_Q4_1: dq_q4_1(g, k, r0, nr, out); break;
    case QT_Q5_0: dq_q5_0(g, k, r0, nr, out); break;
    case QT_Q5_1: dq_q5_1(g, k, r0, nr, out); break;
    case QT_Q8_0: dq_q8_0(g, k, r0, nr, out); break;
    case QT_Q2_K: dq_q2_k(g, k, r0, nr, out); break;
    case QT_Q3_K: dq_q3_k(g, k, r0, nr, out); break;
    case QT_Q4_K: dq_q4_k(g, k, r0, nr, out); break;
    case QT_Q5_K: dq_q5_k(g, k, r0, nr, out); break;
    case QT_Q6_K: dq_q6_k(g, k, r0, nr, out); break;
    case QT_IQ4_NL: dq_iq4_nl(g, k, r0, nr, out); break;
    case QT_IQ4_XS: dq_iq4_xs(g, k, r0, nr, out); break;
    default: break; /* rejected when the matrix was built */
    }
}

static inline const uint8_t *part_group(const QPart *part, int64_t k, int64_t r)
{
    return part->data + r / X8 * X8 * part->row_bytes;
}

typedef struct {
    const QMatrix *w;
    int64_t row0, row1;
    float *out;
} DequantCtx;

#define DEQUANT_ROWS 16 /* rows per task */

static void dequant_task(void *p, int64_t t)
{
    const DequantCtx *c = p;
    const QMatrix *w = c->w;
    const int64_t k = w->k;
    const int64_t r0 = c->row0 + t * DEQUANT_ROWS;
    const int64_t r1 = r0 + DEQUANT_ROWS < c->row1 ? r0 + DEQUANT_ROWS : c->row1;
    for (int64_t r = r0; r < r1;) {
        int64_t local = r;
        int p = 0;
        while (local >= w->parts[p].rows) {
            local -= w->parts[p].rows;
            p++;
        }
        const QPart *part = &w->parts[p];
        /* the rest of this row's group, within the part and the task */
        int64_t nr = X8 - local % X8;
        nr = nr < part->rows - local ? nr : part->rows - local;
        nr = nr < r1 - r ? nr : r1 - r;
        dequant_group_rows(part->qtype, part_group(part, k, local), k, (int)(local % X8), (int)nr, c->out + (r - c->row0) * k);
        r += nr;
    }
}

void ops_dequantize(const QMatrix *w, int64_t row0, int64_t row1, float *out, int nthreads)
{
    DequantCtx c = {w, row0, row1, out};
    const int64_t ntasks = (row1 - row0 + DEQUANT_ROWS - 1) / DEQUANT_ROWS;
    ops_parallel_for(ntasks, (row1 - row0) * w->k >= (1 << 16) ? nthreads : 1, dequant_task, &c);
}

/* rows `ids` of the stacked matrix (an embedding lookup through the output head's copy) */
void ops_dequantize_ids(const QMatrix *w, const int64_t *ids, int64_t n, float *out)
{
    for (int64_t i = 0; i < n; i++) {
        int64_t local = ids[i];
        int p = 0;
        while (local >= w->parts[p].rows) {
            local -= w->parts[p].rows;
            p++;
        }
        dequant_group_rows(w->parts[p].qtype, part_group(&w->parts[p], w->k, local), w->k, (int)(local % X8), 1, out + i * w->k);
    }
}

/* Q8_0 as llama.cpp's quantize_row_q8_0_ref and gguf-py: d = max|x| / 127,
 * q = roundf(x / d) (half away from zero), d stored as fp16. */
typedef struct {
    const float *x;
    int64_t nb;
    uint8_t *out;
} Q8Ctx;

#define Q8_BLOCKS 1024 /* blocks per task */

static void quantize_q8_0_task(void *p, int64_t t)
{
    const Q8Ctx *c = p;
    const int64_t b1 = (t + 1) * Q8_BLOCKS < c->nb ? (t + 1) * Q8_BLOCKS : c->nb;
    for (int64_t b = t * Q8_BLOCKS; b < b1; b++) {
        const float *v = c->x + QK * b;
        uint8_t *blk = c->out + 34 * b;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++)
            amax = fmaxf(amax, fabsf(v[i]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t h = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(blk, &h, 2);
        for (int i = 0; i < QK; i++)
            blk[2 + i] = (uint8_t)(int8_t)roundf(v[i] * id);
    }
}

void ops_quantize_q8_0(const float *x, int64_t n, uint8_t *out, int nthreads)
{
    Q8Ctx c = {x, n / QK, out};
    ops_parallel_for((c.nb + Q8_BLOCKS - 1) / Q8_BLOCKS, n >= (1 << 16) ? nthreads : 1, quantize_q8_0_task, &c);
}

#endif /* x86-64 */
