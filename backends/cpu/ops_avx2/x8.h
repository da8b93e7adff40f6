/* The x8 layout of every block format, and one 32-weight block of it unpacked for AVX2.
 *
 * Include after `#pragma GCC target("avx2,fma,f16c")` (kernel files only).
 *
 * Layout. A block of 8 consecutive rows (a group) is stored block by block; the record of a
 * block is the 8 rows' file blocks with their bytes interleaved unit by unit: the file block
 * is cut into units -- 2 bytes for each fp16 scalar (d, m, dmin, IQ4_XS's scales_h), 4 bytes
 * for everything else -- and the unit at file offset o of row r lands at record offset
 * 8 * o + r * unit. So a 4-byte unit of the 8 rows is one 32-byte AVX2 register with lane r =
 * row r, and an fp16 field of the 8 rows one 16-byte load. A record is 8 * type_size bytes,
 * the same bytes as the 8 file blocks; rows are padded to a multiple of 8 with zero blocks.
 * For Q4_0/Q4_1/Q8_0 this is the layout the x8 kernels always had (ops_avx2.h).
 *
 * Unpacking. x8_unpack() turns 32-block b of a group into the same form for every type:
 * q[c] holds weights 4c..4c+3 of each row (one byte each, lane = row) and per-row scales, so
 * that (for row r, weight i of the block, h = i / 16 the half):
 *
 *     w_i = d * sc[h] * (q_i - OFF) + (m)           Q4_1, Q5_1: m added
 *                                   - (m * mn[h])   Q2_K, Q4_K, Q5_K: m is dmin
 *
 * q is unsigned except for the SIGNED types (Q8_0, IQ4_NL, IQ4_XS: the signed value itself);
 * sc is 1 where a type has no sub-block scale. Dequantization (dequant.c) and the int8
 * kernels (qmatmul.c) both read this; backends/quants.py has the file formats.
 */
#ifndef OPS_X8_H
#define OPS_X8_H

#include <immintrin.h>
#include <stdint.h>

#include "ops_avx2.h"

/* the size of the unit starting at file offset o */
static inline int x8_unit(const QFormat *f, int o)
{
    return o == f->f16[0] || o == f->f16[1] ? 2 : 4;
}

/* per-type constants of the unpacked form */
#define X8_SIGNED(T) ((T) == QT_Q8_0 || (T) == QT_IQ4_NL || (T) == QT_IQ4_XS)
#define X8_OFF(T) ((T) == QT_Q4_0 ? 8 : (T) == QT_Q5_0 ? 16 : (T) == QT_Q3_K ? 4 : (T) == QT_Q6_K ? 32 : 0)
#define X8_HALVES(T) ((T) == QT_Q2_K || (T) == QT_Q3_K || (T) == QT_Q6_K) /* 16-weight sub-blocks */
#define X8_ADD_M(T) ((T) == QT_Q4_1 || (T) == QT_Q5_1)
#define X8_SUB_MIN(T) ((T) == QT_Q2_K || (T) == QT_Q4_K || (T) == QT_Q5_K)
#define X8_SCALED(T) (X8_HALVES(T) || (T) == QT_Q4_K || (T) == QT_Q5_K || (T) == QT_IQ4_XS)
#define X8_BITS(T) ((T) == QT_Q2_K ? 2 : (T) == QT_Q3_K ? 3 : (T) == QT_Q5_0 || (T) == QT_Q5_1 || (T) == QT_Q5_K ? 5 \
                    : (T) == QT_Q6_K ? 6 : X8_SIGNED(T) ? 8 : 4)

typedef struct {
    __m256i q[8];
    __m256 d, m;
    __m256i sc[2], mn[2];
} X8Block;

static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* the 4-byte unit at file offset o of the 8 rows, lane r = row r */
#define UNIT(o) _mm256_loadu_si256((const __m256i *)(rec + 8 * (o)))
/* the fp16 scalar at file offset o of the 8 rows, as 8 floats */
#define HALF(o) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 8 * (o))))

static inline __m256i srl32(__m256i v, int n) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(n)); }
static inline __m256i srl16(__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }
static inline __m256i bits32(__m256i v, int shift, int mask) { return _mm256_and_si256(srl32(v, shift), _mm256_set1_epi32(mask)); }

/* bytes i = 0..3 of each lane: 0x10 where bit k + i of the lane is set (k a multiple of 4) */
static inline __m256i bit4_bytes(__m256i v, int k)
{
    const char b = (char)(k / 8), s = (char)(k % 8);
    const __m256i idx = _mm256_setr_epi8(b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b, 8 + b, 8 + b, 8 + b, 8 + b, 12 + b,
                                         12 + b, 12 + b, 12 + b, b, b, b, b, 4 + b, 4 + b, 4 + b, 4 + b, 8 + b, 8 + b,
                                         8 + b, 8 + b, 12 + b, 12 + b, 12 + b, 12 + b);
    const __m256i mask = _mm256_set1_epi32((int)(0x08040201u << s));
    const __m256i hit = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, idx), mask), mask);
    return _mm256_and_si256(hit, _mm256_set1_epi8(0x10));
}

/* Q4_K/Q5_K: the 6-bit scale and min of sub-block s from the units A (bytes 0..3), B (4..7), C (8..11) */
static inline void k_scale_min(__m256i A, __m256i B, __m256i C, int s, __m256i *sc, __m256i *mn)
{
    if (s < 4) {
        *sc = bits32(A, 8 * s, 63);
        *mn = bits32(B, 8 * s, 63);
    } else {
        const int t = 8 * (s - 4);
        *sc = _mm256_or_si256(bits32(C, t, 15), _mm256_slli_epi32(bits32(A, t + 6, 3), 4));
        *mn = _mm256_or_si256(bits32(C, t + 4, 15), _mm256_slli_epi32(bits32(B, t + 6, 3), 4));
    }
}

/* 256-weight super-blocks: a record holds 8 32-blocks */
#define X8_SUPER(T) ((T) == QT_Q2_K || (T) == QT_Q3_K || (T) == QT_Q4_K || (T) == QT_Q5_K || (T) == QT_Q6_K || (T) == QT_IQ4_XS)

/* the record holding 32-block b of the group at g, and b's index s within it */
static inline const uint8_t *x8_rec(int T, const uint8_t *g, int64_t b, int *s)
{
    *s = X8_SUPER(T) ? (int)(b & 7) : 0;
    return X8_SUPER(T) ? g + (b >> 3) * 8 * qformat(T)->size : g + b * 8 * qformat(T)->size;
}

/* 32-block s of the record rec unpacked; T (and, in the kernels, s) compile-time constants so
 * that every shift and offset folds */
static inline __attribute__((always_inline)) void x8_unpack(const int T, const uint8_t *rec, const int s, X8Block *x)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), one8 = _mm256_set1_epi8(1);
    x->sc[0] = x->sc[1] = _mm256_set1_epi32(1);
    x->mn[0] = x->mn[1] = _mm256_setzero_si256();
    x->m = _mm256_setzero_ps();
    switch (T) {
    case QT_Q4_0: case QT_Q4_1: case QT_Q5_0: case QT_Q5_1: case QT_IQ4_NL: {
        const int qs = T == QT_Q4_1 ? 4 : T == QT_Q5_0 ? 6 : T == QT_Q5_1 ? 8 : 2;
        x->d = HALF(0);
        if (T == QT_Q4_1 || T == QT_Q5_1)
            x->m = HALF(2);
        for (int c = 0; c < 4; c++) {
            const __m256i raw = UNIT(qs + 4 * c);
            x->q[c] = _mm256_and_si256(raw, m4);
            x->q[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        if (T == QT_Q5_0 || T == QT_Q5_1) {
            const __m256i qh = UNIT(qs - 4); /* bit i = 5th bit of weight i */
            for (int c = 0; c < 4; c++) {
                x->q[c] = _mm256_or_si256(x->q[c], bit4_bytes(qh, 4 * c));
                x->q[c + 4] = _mm256_or_si256(x->q[c + 4], bit4_bytes(qh, 16 + 4 * c));
            }
        }
        break;
    }
    case QT_Q8_0:
        x->d = HALF(0);
        for (int c = 0; c < 8; c++)
            x->q[c] = UNIT(2 + 4 * c);
        break;
    case QT_IQ4_XS: { /* sub-block s: scale from scales_l (4 bits) and scales_h (2 bits), minus 32 */
        x->d = HALF(0);
        const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(rec + 16)));
        x->sc[0] = x->sc[1] = _mm256_sub_epi32(
            _mm256_or_si256(bits32(UNIT(4), 4 * s, 15), _mm256_slli_epi32(bits32(hi, 2 * s, 3), 4)), _mm256_set1_epi32(32));
        for (int c = 0; c < 4; c++) {
            const __m256i raw = UNIT(8 + 16 * s + 4 * c);
            x->q[c] = _mm256_and_si256(raw, m4);
            x->q[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        break;
    }
    case QT_Q2_K: case QT_Q3_K: { /* block s = 32 h + ... : weights 128 h + 32 j + l */
        const int h = s >> 2, j = s & 3;
        const int qs = T == QT_Q2_K ? 16 : 32;
        for (int c = 0; c < 8; c++)
            x->q[c] = _mm256_and_si256(srl16(UNIT(qs + 32 * h + 4 * c), 2 * j), m2);
        if (T == QT_Q2_K) {
            x->d = HALF(80);
            x->m = HALF(82);
            for (int t = 0; t < 2; t++) { /* sub-block 2s + t: byte (2s + t) of scales = [min : 4 | scale : 4] */
                const int sb = 2 * s + t;
                const __m256i r = UNIT(4 * (sb / 4));
                x->sc[t] = bits32(r, 8 * (sb % 4), 15);
                x->mn[t] = bits32(r, 8 * (sb % 4) + 4, 15);
            }
        } else {
            x->d = HALF(108);
            for (int c = 0; c < 8; c++) /* hmask bit 4h + j: the 3rd bit, set = no -4 */
                x->q[c] = _mm256_or_si256(x->q[c], _mm256_slli_epi16(_mm256_and_si256(srl16(UNIT(4 * c), 4 * h + j), one8), 2));
            for (int t = 0; t < 2; t++) {
                const int sb = 2 * s + t;
                const __m256i lo = bits32((sb % 8) < 4 ? UNIT(96) : UNIT(100), 8 * (sb % 4) + 4 * (sb / 8), 15);
                const __m256i hi = bits32(UNIT(104), 8 * (sb % 4) + 2 * (sb / 4), 3);
                x->sc[t] = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
            }
        }
        break;
    }
    case QT_Q4_K: case QT_Q5_K: {
        x->d = HALF(0);
        x->m = HALF(2);
        k_scale_min(UNIT(4), UNIT(8), UNIT(12), s, &x->sc[0], &x->mn[0]);
        x->sc[1] = x->sc[0];
        x->mn[1] = x->mn[0];
        const int qs = T == QT_Q4_K ? 16 : 48;
        for (int c = 0; c < 8; c++) {
            const __m256i raw = UNIT(qs + 32 * (s >> 1) + 4 * c);
            x->q[c] = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(raw, 4) : raw, m4);
            if (T == QT_Q5_K) /* qh[l] bit s: the 5th bit */
                x->q[c] = _mm256_or_si256(x->q[c], _mm256_slli_epi16(_mm256_and_si256(srl16(UNIT(16 + 4 * c), s), one8), 4));
        }
        break;
    }
    case QT_Q6_K: { /* block s = 4 h + j: low 4 bits in ql, high 2 in qh, 16 int8 scales */
        const int h = s >> 2, j = s & 3;
        x->d = HALF(208);
        for (int c = 0; c < 8; c++) {
            const __m256i lraw = UNIT(64 * h + 32 * (j & 1) + 4 * c);
            const __m256i lo = _mm256_and_si256(j < 2 ? lraw : _mm256_srli_epi16(lraw, 4), m4);
            /* the 2 bits at 2j of each byte, moved to bits 4-5: one shift (none for j = 2) and a mask
             * (16-bit shifts: what crosses a byte boundary lands outside bits 4-5) */
            const __m256i qh = UNIT(128 + 32 * h + 4 * c);
            const __m256i hs = j < 2 ? _mm256_slli_epi16(qh, 4 - 2 * j) : j == 3 ? _mm256_srli_epi16(qh, 2) : qh;
            x->q[c] = _mm256_or_si256(lo, _mm256_and_si256(hs, _mm256_set1_epi8(0x30)));
        }
        for (int t = 0; t < 2; t++) {
            const int sb = 2 * s + t;
            x->sc[t] = _mm256_srai_epi32(_mm256_sll_epi32(UNIT(192 + 4 * (sb / 4)), _mm_cvtsi32_si128(24 - 8 * (sb % 4))), 24);
        }
        break;
    }
    default:
        break;
    }
    if (T == QT_IQ4_NL || T == QT_IQ4_XS) { /* 4-bit indices -> the non-linear int8 values */
        const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES));
        for (int c = 0; c < 8; c++)
            x->q[c] = _mm256_shuffle_epi8(table, x->q[c]);
    }
}

#undef UNIT
#undef HALF

#endif
