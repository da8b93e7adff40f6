/* Block formats <-> float32, AVX2: the dequantize-into-GEMM path and Q8_0 requantization.
 *
 * Dequantization is bit-identical to engine/model/quants.py (and so to gguf-py): the
 * same float32 products in the same order, no FMA contraction (`q * d + m` is a
 * multiply, then an add).
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ops_avx2.h"
#include "simd.h"

/* 32 int8 (signed) or uint8 values times d (plus m), stored as 32 floats */
static inline void store_scaled_i8(__m256i q, int is_signed, __m256 d, const __m256 *m, float *out)
{
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    for (int i = 0; i < 4; i++) {
        const __m256i w = is_signed ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]);
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(w), d);
        if (m)
            f = _mm256_add_ps(f, *m);
        _mm256_storeu_ps(out + 8 * i, f);
    }
}

static void dequant_row(int qtype, const uint8_t *w, int64_t k, float *out);

/* ---- the x8 layout (ops_avx2.h): repacking and reading one row back ---- */

/* offsets of d, m and qs in a record, and the file block's layout */
static inline void x8_fields(int qtype, int64_t *m_off, int64_t *qs_off, int64_t *chunks, int64_t *bs, int64_t *bqs)
{
    *m_off = qtype == QT_Q4_1 ? 16 : -1;
    *qs_off = qtype == QT_Q4_1 ? 32 : 16;
    *chunks = qtype == QT_Q8_0 ? 8 : 4;
    *bs = qtype == QT_Q4_0 ? 18 : qtype == QT_Q4_1 ? 20 : 34;
    *bqs = qtype == QT_Q4_1 ? 4 : 2; /* qs offset in a file block */
}

int ops_x8_supported(int qtype)
{
    return qtype == QT_Q4_0 || qtype == QT_Q4_1 || qtype == QT_Q8_0;
}

int64_t ops_x8_bytes(int qtype, int64_t rows, int64_t k)
{
    return (rows + X8 - 1) / X8 * (k / QK) * x8_record(qtype);
}

/* block b of row r (within its group) out of the x8 layout, as the file stores it */
static inline void x8_block(int qtype, const uint8_t *group, int64_t b, int r, uint8_t *blk)
{
    int64_t m_off, qs_off, chunks, bs, bqs;
    x8_fields(qtype, &m_off, &qs_off, &chunks, &bs, &bqs);
    const uint8_t *rec = group + b * x8_record(qtype);
    memcpy(blk, rec + 2 * r, 2);
    if (m_off >= 0)
        memcpy(blk + 2, rec + m_off + 2 * r, 2);
    for (int64_t c = 0; c < chunks; c++)
        memcpy(blk + bqs + 4 * c, rec + qs_off + 32 * c + 4 * r, 4);
}

typedef struct {
    int qtype;
    const uint8_t *src;
    int64_t rows, k;
    uint8_t *dst;
} RepackCtx;

static void repack_task(void *p, int64_t g)
{
    const RepackCtx *c = p;
    int64_t m_off, qs_off, chunks, bs, bqs;
    x8_fields(c->qtype, &m_off, &qs_off, &chunks, &bs, &bqs);
    const int64_t nb = c->k / QK, rs = x8_record(c->qtype);
    uint8_t *group = c->dst + g * nb * rs;
    memset(group, 0, (size_t)(nb * rs)); /* padding rows: zero scales and weights */
    for (int r = 0; r < X8 && g * X8 + r < c->rows; r++) {
        const uint8_t *row = c->src + (g * X8 + r) * nb * bs;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bs;
            uint8_t *rec = group + b * rs;
            memcpy(rec + 2 * r, blk, 2);
            if (m_off >= 0)
                memcpy(rec + m_off + 2 * r, blk + 2, 2);
            for (int64_t ch = 0; ch < chunks; ch++)
                memcpy(rec + qs_off + 32 * ch + 4 * r, blk + bqs + 4 * ch, 4);
        }
    }
}

void ops_repack_x8(int qtype, const uint8_t *src, int64_t rows, int64_t k, uint8_t *dst, int nthreads)
{
    RepackCtx c = {qtype, src, rows, k, dst};
    ops_parallel_for((rows + X8 - 1) / X8, nthreads, repack_task, &c);
}

/* row `r` of a part, in either layout, as float32 */
static void dequant_part_row(const QPart *part, int64_t k, int64_t r, float *out)
{
    if (!part->x8) {
        dequant_row(part->qtype, part->data + r * part->row_bytes, k, out);
        return;
    }
    const int64_t nb = k / QK, rs = x8_record(part->qtype);
    const uint8_t *group = part->data + (r / X8) * nb * rs;
    uint8_t blk[34];
    for (int64_t b = 0; b < nb; b++) {
        x8_block(part->qtype, group, b, (int)(r % X8), blk);
        dequant_row(part->qtype, blk, QK, out + QK * b);
    }
}

static void dequant_row(int qtype, const uint8_t *w, int64_t k, float *out)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    switch (qtype) {
    case QT_Q4_0:
        for (int64_t b = 0; b < k / QK; b++, w += 18)
            store_scaled_i8(_mm256_sub_epi8(nibbles32(w + 2), _mm256_set1_epi8(8)), 1, f16_bcast(w), NULL, out + QK * b);
        break;
    case QT_Q4_1:
        for (int64_t b = 0; b < k / QK; b++, w += 20) {
            const __m256 m = f16_bcast(w + 2);
            store_scaled_i8(nibbles32(w + 4), 0, f16_bcast(w), &m, out + QK * b);
        }
        break;
    case QT_Q8_0:
        for (int64_t b = 0; b < k / QK; b++, w += 34)
            store_scaled_i8(_mm256_loadu_si256((const __m256i *)(w + 2)), 1, f16_bcast(w), NULL, out + QK * b);
        break;
    case QT_Q4_K:
        for (int64_t sb = 0; sb < k / QK_K; sb++, w += 144) {
            const float d = f16_load(w), dmin = f16_load(w + 2);
            const uint8_t *p = w + 4;
            for (int s = 0; s < 8; s++) {
                const int j = s & 3;
                const uint8_t sc = s < 4 ? (p[j] & 63) : ((p[j + 8] & 0x0F) | ((p[j] >> 6) << 4));
                const uint8_t mn = s < 4 ? (p[j + 4] & 63) : ((p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4));
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * (s >> 1)));
                const __m256i q = (s & 1) ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4) : _mm256_and_si256(raw, m4);
                /* q * (d * sc) - (dmin * mn): a multiply, then a subtraction of the negated add */
                float *o = out + QK_K * sb + QK * s;
                store_scaled_i8(q, 0, _mm256_set1_ps(d * (float)sc), NULL, o);
                const __m256 mm = _mm256_set1_ps(dmin * (float)mn);
                for (int i = 0; i < QK; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_sub_ps(_mm256_loadu_ps(o + i), mm));
            }
        }
        break;
    case QT_Q6_K:
        for (int64_t sb = 0; sb < k / QK_K; sb++, w += 210) {
            const uint8_t *ql = w, *qh = w + 128;
            const int8_t *scales = (const int8_t *)(w + 192);
            const float d = f16_load(w + 208);
            for (int j8 = 0; j8 < 8; j8++) {
                const int h = j8 >> 2, j = j8 & 3;
                const __m256i lraw = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (j & 1)));
                const __m256i lo = j < 2 ? _mm256_and_si256(lraw, m4) : _mm256_and_si256(_mm256_srli_epi16(lraw, 4), m4);
                const __m256i hraw = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
                const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(hraw, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
                const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
                /* two 16-weight sub-blocks, each with its own scale */
                float *o = out + QK_K * sb + QK * j8;
                float tmp[32];
                store_scaled_i8(q, 1, _mm256_set1_ps(1.0f), NULL, tmp);
                const __m256 s0 = _mm256_set1_ps(d * (float)scales[2 * j8]);
                const __m256 s1 = _mm256_set1_ps(d * (float)scales[2 * j8 + 1]);
                _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(tmp), s0));
                _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_loadu_ps(tmp + 8), s0));
                _mm256_storeu_ps(o + 16, _mm256_mul_ps(_mm256_loadu_ps(tmp + 16), s1));
                _mm256_storeu_ps(o + 24, _mm256_mul_ps(_mm256_loadu_ps(tmp + 24), s1));
            }
        }
        break;
    default:
        break; /* rejected when the matrix was built */
    }
}

/* 8 rows of an x8 group at once, bit-identical to dequant_row: each 32-byte chunk
 * holds 4 weights of each row; convert, scale (and shift) per row, store 4 floats per row. */
static void dequant_group_x8(int qtype, const uint8_t *group, int64_t k, float *out)
{
    int64_t m_off, qs_off, chunks, bs, bqs;
    x8_fields(qtype, &m_off, &qs_off, &chunks, &bs, &bqs);
    const int64_t nb = k / QK, rs = x8_record(qtype);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *rec = group + b * rs;
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)rec));
        const __m256 mv = m_off >= 0 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + m_off))) : _mm256_setzero_ps();
        /* per row pair p (rows 2p, 2p+1): [d_2p x4 | d_2p+1 x4] */
        __m256 dp[4], mp[4];
        for (int p = 0; p < 4; p++) {
            const __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
            dp[p] = _mm256_permutevar8x32_ps(dv, idx);
            mp[p] = _mm256_permutevar8x32_ps(mv, idx);
        }
        for (int64_t c = 0; c < chunks; c++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(rec + qs_off + 32 * c));
            /* (weights, their offset in the row): Q4 chunks give two, Q8_0 one */
            __m256i vals[2];
            int64_t offs[2];
            int nv;
            if (qtype == QT_Q8_0) {
                vals[0] = raw, offs[0] = 4 * c, nv = 1;
            } else {
                vals[0] = _mm256_and_si256(raw, m4), offs[0] = 4 * c;
                vals[1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), offs[1] = 16 + 4 * c, nv = 2;
                if (qtype == QT_Q4_0) {
                    vals[0] = _mm256_sub_epi8(vals[0], _mm256_set1_epi8(8));
                    vals[1] = _mm256_sub_epi8(vals[1], _mm256_set1_epi8(8));
                }
            }
            for (int v = 0; v < nv; v++) {
                const __m128i lo = _mm256_castsi256_si128(vals[v]), hi = _mm256_extracti128_si256(vals[v], 1);
                const __m128i pairs[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
                for (int p = 0; p < 4; p++) {
                    const __m256i wi = qtype == QT_Q4_1 ? _mm256_cvtepu8_epi32(pairs[p]) : _mm256_cvtepi8_epi32(pairs[p]);
                    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(wi), dp[p]);
                    if (qtype == QT_Q4_1)
                        f = _mm256_add_ps(f, mp[p]);
                    _mm_storeu_ps(out + (2 * p) * k + QK * b + offs[v], _mm256_castps256_ps128(f));
                    _mm_storeu_ps(out + (2 * p + 1) * k + QK * b + offs[v], _mm256_extractf128_ps(f, 1));
                }
            }
        }
    }
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
        float *o = c->out + (r - c->row0) * k;
        if (part->x8 && local % X8 == 0 && local + X8 <= part->rows && r + X8 <= r1) {
            dequant_group_x8(part->qtype, part->data + (local / X8) * (k / QK) * x8_record(part->qtype), k, o);
            r += X8;
        } else {
            dequant_part_row(part, k, local, o);
            r++;
        }
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
        dequant_part_row(&w->parts[p], w->k, local, out + i * w->k);
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
