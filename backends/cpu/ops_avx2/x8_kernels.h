/* The x8 int8 kernels, included by qmatmul.c (AVX2) and qmatmul_vnni.c (AVX512-VNNI, X8_VNNI 1):
 * the same source compiled twice for two instruction sets; each defines the file-static x8_rows. */
#ifndef OPS_X8_KERNELS_H
#define OPS_X8_KERNELS_H

#include <string.h>

#include "x8.h"

#ifndef X8_VNNI
#define X8_VNNI 0
#endif
/* activation rows per tile: 4 in AVX2's 16 registers, 8 in AVX-512's 32 (the VNNI build) */
#if X8_VNNI
#define MAXC 8
#else
#define MAXC 4
#endif
#ifndef PF_GROUPS
/* prefetch the same record this many 8-row groups on. 8 (64 rows) was best while one-token
 * items were 64 rows taken in turn; with a thread's items long runs (qmatmul.c, RUNS), 4: the
 * whole 1B model's matrices at batch 1, 2 threads, two sweeps of 5 rounds (weight_sweep.py):
 * Q4_K_M 25.1 -> 20.2 and 24.9 -> 23.9 ms, Q6_K 36.4 -> 31.7 and 37.1 -> 31.8; tg64, 5 rounds:
 * Q4_K_M 38.9 -> 40.7 tok/s, Q6_K 32.2 -> 32.9; batch 16 and 512 the same within noise */
#define PF_GROUPS 4
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

#if X8_VNNI
/* acc += u8 x (the 4 int8 at p, broadcast to every lane): one instruction with an embedded
 * broadcast where the intrinsics compile to a broadcast and a vpdpbusd (3-14 % faster) */
static inline __attribute__((always_inline)) __m256i dpbusd_bcast(__m256i acc, __m256i u8, const int8_t *p)
{
    __asm__("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*(const int32_t *)p));
    return acc;
}
#endif

/* int32 lanes (a, b) -> int16 pairs (a, b) for madd */
static inline __m256i pair16(__m256i a, __m256i b)
{
    return _mm256_blend_epi16(a, _mm256_slli_epi32(b, 16), 0xAA);
}

/* One activation tile: C rows' accumulators, their quantized blocks and sums. The rows lie in
 * one group of g rows of the QAct (ops_avx2.h): row j of block b is q block yq + 32 (g b + j)
 * and entry g b + j of yd, ys, yi, yh, yp (yo at 2x) -- constant offsets from one pointer a block. */
typedef struct {
    __m256 acc[MAXC];
    __m256i pi[MAXC], pm[MAXC]; /* X8_INT_SUPER: the super-block's int32 dots (and Q2_K's min terms) so far */
    const int8_t *yq;
    const float *yd, *ys;
    const int32_t *yi, *yh, *yo, *yp;
    int64_t g;
} Tile;

/* VNNI Q6_K: each half's accumulator starts at -32 times the activation half's sum (QAct.off6), so
 * the sub-block scale multiplies (dot - 32 S) and the offset costs nothing a row: the same int32 as
 * subtracting 32 (sc0 S0 + sc1 S1) after (its madd, shift and subtract a row made up ~10 % of the
 * kernel at 16 rows) */
#define X8_OFF_START(T) (X8_VNNI && (T) == QT_Q6_K)

/* AVX2, 256-weight super-block types: the activations have one scale a super-block (QAct.sblocks
 * 8) and d, dmin are the super-block's, so a block's int32 dot (sub-block scales and offset
 * applied) adds into the tile's int32 sums and only the super-block is scaled into float
 * (super_flush): one conversion and multiply-add a super-block instead of a block's (the float
 * epilogue was 17 % of a 64-row sweep of the 1B Q4_K_M model on Zen 1). int32 holds 8 blocks: at
 * most 8 * 32 * 63 * 127 * 127 (Q6_K, Q5_K's are smaller). The VNNI build keeps the epilogue a
 * block (the same values: dy is the same for the 8 blocks). */
#define X8_INT_SUPER(T) (!X8_VNNI && X8_SUPER(T))
/* ... and Q4_K/Q5_K's one min a block: taken two blocks a madd at the flush (QAct.pairs) */
#define X8_MIN_PAIRS(T) (X8_INT_SUPER(T) && X8_SUB_MIN(T) && !X8_HALVES(T))

/* One 32-block of the 8 rows as every activation row of a tile reads it: unpacked (x8_unpack),
 * with the scale pairs and the min the epilogue takes. Made in registers for each tile, or
 * once for all the tiles of an activation chunk (X8_PREP_ROWS below). */
typedef struct {
    X8Block x;
    __m256i sp[2];      /* AVX2: the madd multipliers of each half (sub-block scales or ones) */
    __m256i sc01, mn01; /* the halves' scales and mins as int16 pairs */
    __m256 dmn;         /* VNNI Q4_K/Q5_K: dmin * mn, one min for the block (AVX2: mnp) */
    __m256i mnp;        /* X8_MIN_PAIRS, an even block b: the mins of b and b + 1 as int16 pairs */
} X8Prep;

static inline __attribute__((always_inline)) void block_prep(const int T, const uint8_t *rec, const int s, X8Prep *p)
{
    const __m256i ones = _mm256_set1_epi16(1);
    x8_unpack(T, rec, s, &p->x);
    p->sp[0] = X8_SCALED(T) ? pair16(p->x.sc[0], p->x.sc[0]) : ones;
    p->sp[1] = X8_SCALED(T) ? pair16(p->x.sc[1], p->x.sc[1]) : ones;
    p->sc01 = pair16(p->x.sc[0], p->x.sc[1]);
    p->mn01 = pair16(p->x.mn[0], p->x.mn[1]);
    p->dmn = X8_SUB_MIN(T) && !X8_HALVES(T) && !X8_INT_SUPER(T) ? _mm256_mul_ps(p->x.m, _mm256_cvtepi32_ps(p->x.mn[0])) : _mm256_setzero_ps();
}

/* 32-block b of the 8 rows, prepared in pp, against the tile's C activation rows */
static inline __attribute__((always_inline)) void block_x8(const int T, const int C, const X8Prep *pp, int64_t b, Tile *t)
{
#if !X8_VNNI
    const int G = X8_BITS(T) <= 4 && !X8_HALVES(T) ? 8 : X8_BITS(T) == 6 ? 2 : 4; /* chunks summed in s16 */
    /* the madd multipliers: ones for a type without sub-block scales, one pair for both halves of
     * a 32-weight sub-block (what prep_store keeps of them) */
    const __m256i sp0 = X8_SCALED(T) ? pp->sp[0] : _mm256_set1_epi16(1);
    const __m256i sp[2] = {sp0, X8_HALVES(T) ? pp->sp[1] : sp0};
#endif
    const X8Block x = pp->x;
    const __m256i sc01 = pp->sc01, mn01 = pp->mn01;
    const __m256 dmn = pp->dmn;
#if X8_VNNI
    __m256i uq[8]; /* signed types: q + 128 as u8 */
    if (X8_SIGNED(T))
        for (int c = 0; c < 8; c++)
            uq[c] = _mm256_xor_si256(x.q[c], _mm256_set1_epi8((char)0x80));
#else
    __m256i aq[8]; /* signed types: |q| */
    if (X8_SIGNED(T))
        for (int c = 0; c < 8; c++)
            aq[c] = _mm256_sign_epi8(x.q[c], x.q[c]);
#endif
#if X8_VNNI
    /* VNNI: chunk by chunk across the tile's rows -- C independent accumulator chains, one
     * weight register live at a time (row by row, as AVX2 below, the compiler spilled: this
     * order ran Q4_K 15-27 % and Q4_0 21 % faster at 8-32 rows; the same order on AVX2's 16
     * registers ran 5 % slower) */
    __m256i pj[MAXC], hj[MAXC];
    const int8_t *y0 = t->yq + b * QK * t->g;
#pragma GCC unroll 8
    for (int j = 0; j < C; j++)
        pj[j] = X8_OFF_START(T) ? _mm256_set1_epi32(t->yo[2 * (b * t->g + j)]) : _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        if (X8_HALVES(T) && c == 4) {
#pragma GCC unroll 8
            for (int j = 0; j < C; j++) {
                hj[j] = _mm256_mullo_epi32(pj[j], x.sc[0]);
                pj[j] = X8_OFF_START(T) ? _mm256_set1_epi32(t->yo[2 * (b * t->g + j) + 1]) : _mm256_setzero_si256();
            }
        }
#pragma GCC unroll 8
        for (int j = 0; j < C; j++)
            pj[j] = C == 1 /* decode: the intrinsics' broadcast streamed 3 % faster from DRAM */
                        ? _mm256_dpbusd_epi32(pj[j], X8_SIGNED(T) ? uq[c] : x.q[c], bcast4(y0 + 4 * c))
                        : dpbusd_bcast(pj[j], X8_SIGNED(T) ? uq[c] : x.q[c], y0 + QK * j + 4 * c);
    }
#endif
#pragma GCC unroll 8
    for (int j = 0; j < C; j++) {
        const int64_t at = b * t->g + j;
#if X8_VNNI
        __m256i p = pj[j];
        if (X8_HALVES(T)) {
            p = _mm256_add_epi32(hj[j], _mm256_mullo_epi32(p, x.sc[1]));
        } else {
            if (X8_SIGNED(T)) /* the weights went in as q + 128 */
                p = _mm256_sub_epi32(p, _mm256_slli_epi32(_mm256_set1_epi32(t->yi[at]), 7));
            if (X8_SCALED(T))
                p = _mm256_mullo_epi32(p, x.sc[0]);
        }
#else
        const int8_t *y = t->yq + QK * at;
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
#endif
        const __m256i s01 = _mm256_set1_epi32(t->yh[at]); /* the halves' sums, int16 pairs */
        if (X8_OFF(T) && !X8_HALVES(T))
            p = _mm256_sub_epi32(p, _mm256_set1_epi32(X8_OFF(T) * t->yi[at]));
        else if (X8_OFF(T) && !X8_OFF_START(T))
            p = _mm256_sub_epi32(p, _mm256_slli_epi32(_mm256_madd_epi16(sc01, s01), __builtin_ctz(X8_OFF(T))));
        if (X8_INT_SUPER(T)) {
            t->pi[j] = _mm256_add_epi32(t->pi[j], p);
            if (X8_SUB_MIN(T) && X8_HALVES(T)) /* Q2_K; Q4_K and Q5_K at the flush */
                t->pm[j] = _mm256_add_epi32(t->pm[j], _mm256_madd_epi16(mn01, s01));
            continue;
        }
        const __m256 dy = _mm256_broadcast_ss(t->yd + at);
        t->acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(x.d, dy), t->acc[j]);
        if (X8_ADD_M(T))
            t->acc[j] = _mm256_fmadd_ps(x.m, _mm256_broadcast_ss(t->ys + at), t->acc[j]);
        else if (X8_SUB_MIN(T) && X8_HALVES(T))
            t->acc[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mn01, s01)), _mm256_mul_ps(x.m, dy), t->acc[j]);
        else if (X8_SUB_MIN(T))
            t->acc[j] = _mm256_fnmadd_ps(dmn, _mm256_broadcast_ss(t->ys + at), t->acc[j]);
    }
}

/* X8_INT_SUPER: the super-block of blocks b..b+7 the tile summed, into the float accumulators;
 * pp one of its blocks (d, dmin are the super-block's), mp[i] (X8_MIN_PAIRS) the mins of blocks
 * 2i and 2i + 1 as int16 pairs */
static inline __attribute__((always_inline)) void super_flush(const int T, const int C, const X8Prep *pp,
                                                              const __m256i *mp, int64_t b, Tile *t)
{
#pragma GCC unroll 8
    for (int j = 0; j < C; j++) {
        const __m256 dy = _mm256_broadcast_ss(t->yd + b * t->g + j);
        t->acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t->pi[j]), _mm256_mul_ps(pp->x.d, dy), t->acc[j]);
        if (X8_SUB_MIN(T)) {
            __m256i pm = t->pm[j]; /* Q2_K: summed a block; zero for Q4_K/Q5_K, taken here */
            if (X8_MIN_PAIRS(T))
                for (int i = 0; i < 4; i++)
                    pm = _mm256_add_epi32(pm, _mm256_madd_epi16(mp[i], _mm256_set1_epi32(t->yp[(b + 2 * i) * t->g + j])));
            t->acc[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_mul_ps(pp->x.m, dy), t->acc[j]);
        }
        t->pi[j] = t->pm[j] = _mm256_setzero_si256();
    }
}

/* A weight line wanted PF_GROUPS groups on. Tiles smaller than a full one (decode, small
 * batches) stream weights at memory speed: into L2 only (prefetcht1), as prefetcht0 filled L1
 * with lines not needed for microseconds, evicting the tile's activations and record -- batch-1
 * sweeps over the 1B Q4_K_M file ran 12 % faster with T1 on 2 threads (52 % on 1), Q6_K 23 %,
 * 4-row tiles 28 % (VNNI build). Full tiles (MAXC rows: prefill) are compute-bound: T0, as
 * measured before (in the AVX2 build, whose full tile is 4 rows, too). */
static inline __attribute__((always_inline)) void x8_prefetch(const int C, const uint8_t *p)
{
    if (C < MAXC)
        _mm_prefetch((const char *)p, _MM_HINT_T1);
    else
        _mm_prefetch((const char *)p, _MM_HINT_T0);
}

/* a tile of C activation rows from c0, its accumulators zero */
static inline __attribute__((always_inline)) Tile tile_start(const int C, const QAct *a, int64_t c0)
{
    const int64_t at0 = act_at(a, c0, 0); /* the tile never crosses a group: see x8 rows below */
    Tile t = {.yq = a->q + QK * at0, .yd = a->d + at0, .ys = a->s + at0, .yi = a->isum + at0, .yh = a->halves + at0,
              .yo = a->off6 + 2 * at0, .yp = a->pairs + at0,
              .g = a->g};
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
        t.acc[c] = _mm256_setzero_ps();
        t.pi[c] = t.pm[c] = _mm256_setzero_si256();
    }
    return t;
}

/* the tile's outputs: C rows of `valid` (of 8) columns */
static inline __attribute__((always_inline)) void tile_store(const int C, const Tile *t, float *out, int64_t c0,
                                                             int64_t ldo, int valid)
{
#pragma GCC unroll 8
    for (int j = 0; j < C; j++) {
        if (valid == X8) {
            _mm256_storeu_ps(out + (c0 + j) * ldo, t->acc[j]);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, t->acc[j]);
            memcpy(out + (c0 + j) * ldo, tmp, (size_t)valid * sizeof(float));
        }
    }
}

static inline __attribute__((always_inline)) void tile_x8(
    const int T, const int C, const uint8_t *g, int64_t nb, int64_t gstride, const QAct *a, int64_t c0,
    float *out, int64_t ldo, int valid)
{
    const int64_t rs = x8_record(T);
    Tile t = tile_start(C, a, c0);
    if (X8_SUPER(T)) {
        for (int64_t sb = 0; sb < nb / 8; sb++) {
            const uint8_t *rec = g + sb * rs;
            X8Prep pp;
            __m256i mp[4], mn_even = _mm256_setzero_si256();
            /* the 8 blocks spelled out: each with its s a constant, shifts and offsets fold; each
             * prefetches an eighth of the same record PF_GROUPS groups on (all of it at once
             * would be a burst of up to 27 lines) */
#define X8_BLOCK(s)                                                                                         \
    for (int64_t off = (s) * rs / 8; off < ((s) + 1) * rs / 8; off += 64)                                   \
        x8_prefetch(C, rec + PF_GROUPS * gstride + off);                                                   \
    block_prep(T, rec, s, &pp);                                                                             \
    if (X8_MIN_PAIRS(T) && (s) % 2 == 0)                                                                    \
        mn_even = pp.x.mn[0];                                                                               \
    else if (X8_MIN_PAIRS(T))                                                                               \
        mp[(s) / 2] = pair16(mn_even, pp.x.mn[0]);                                                          \
    block_x8(T, C, &pp, 8 * sb + (s), &t);                                                                  \
    if (C == 1) /* decode: no weight loads hoisted across blocks (spills; Q6_K ran at a third) */  \
        __asm__ volatile("" ::: "memory");
            X8_BLOCK(0) X8_BLOCK(1) X8_BLOCK(2) X8_BLOCK(3) X8_BLOCK(4) X8_BLOCK(5) X8_BLOCK(6) X8_BLOCK(7)
#undef X8_BLOCK
            if (X8_INT_SUPER(T))
                super_flush(T, C, &pp, mp, 8 * sb, &t);
        }
    } else {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *rec = g + b * rs;
#pragma GCC unroll 5
            for (int64_t off = 0; off < rs; off += 64)
                x8_prefetch(C, rec + PF_GROUPS * gstride + off);
            X8Prep pp;
            block_prep(T, rec, 0, &pp);
            block_x8(T, C, &pp, b, &t);
        }
    }
    tile_store(C, &t, out, c0, ldo, valid);
}

/* ---- prepared groups: a weight group unpacked once for all the tiles of an activation chunk ----
 *
 * tile_x8 unpacks each block again for every tile of C activation rows. On AVX2 (4 rows a tile)
 * the unpacking and the scale pairs were as much work as the epilogue: a 64-row sweep of the
 * 1B Q4_K_M model on Zen 1 ran 23 % faster with either knocked out. With X8_PREP_ROWS (16) or more
 * activation rows in a chunk, a group's blocks are prepared once into a thread's scratch
 * (X8Prep, 608 bytes a block, of which prep_store writes what the type reads) and every tile
 * reads them from there (L1/L2). Same arithmetic, same bits. Off for the VNNI build (8-row
 * tiles already share an unpacking over 8 rows, and this machine could not measure it) and for
 * the signed types (their unpacking is a load). */
#ifndef X8_PREP_ROWS
/* the whole 1B Q4_K_M model's matrices (weight_sweep.py, 4 rounds, Zen 1): 8 rows 264 -> 304 ms
 * prepared (two tiles do not pay for the stores), 12 rows 384 -> 381, 16 rows 504 -> 486 */
#define X8_PREP_ROWS (X8_VNNI ? 0 : 16)
#endif
#define X8_PREPARED(T) (X8_PREP_ROWS > 0 && !X8_SIGNED(T))

/* Block s of a record (0 for 32-weight types), prepared in p, into the scratch at dst: only the
 * fields tile_prepared reads for this type (block_x8, and super_flush at a super-block's last
 * block); the rest of dst stays unwritten and unread. A Q4_K block writes 9 to 11 of X8Prep's 19
 * registers (Zen 1 stores 16 bytes a cycle). Against writing all of them, the whole 1B model's
 * matrices at 16 rows (weight_sweep.py, 5 rounds): Q4_K_M 492.5 -> 479.4 ms, Q4_0 448.7 -> 438.7. */
static inline __attribute__((always_inline)) void prep_store(const int T, const int s, const X8Prep *p, X8Prep *dst)
{
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++)
        dst->x.q[c] = p->x.q[c];
    if (X8_SCALED(T))
        dst->sp[0] = p->sp[0];
    if (X8_HALVES(T))
        dst->sp[1] = p->sp[1];
    if (X8_HALVES(T) && X8_OFF(T))
        dst->sc01 = p->sc01;
    if (X8_HALVES(T) && X8_SUB_MIN(T))
        dst->mn01 = p->mn01;
    if (!X8_INT_SUPER(T) || s == 7) {
        dst->x.d = p->x.d;
        dst->x.m = p->x.m;
    }
}

/* all nb blocks of the group at g into buf */
static inline __attribute__((always_inline)) void group_prep(const int T, const uint8_t *g, int64_t nb, X8Prep *buf)
{
    const int64_t rs = x8_record(T);
    if (X8_SUPER(T)) {
        for (int64_t sb = 0; sb < nb / 8; sb++) {
            const uint8_t *rec = g + sb * rs;
            X8Prep *dst = buf + 8 * sb;
            __m256i mn_even = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int s = 0; s < 8; s++) {
                X8Prep pp;
                block_prep(T, rec, s, &pp);
                prep_store(T, s, &pp, dst + s);
                if (X8_MIN_PAIRS(T) && s % 2 == 0)
                    mn_even = pp.x.mn[0];
                else if (X8_MIN_PAIRS(T))
                    dst[s - 1].mnp = pair16(mn_even, pp.x.mn[0]);
            }
        }
    } else {
        for (int64_t b = 0; b < nb; b++) {
            X8Prep pp;
            block_prep(T, g + b * rs, 0, &pp);
            prep_store(T, 0, &pp, buf + b);
        }
    }
}

static inline __attribute__((always_inline)) void tile_prepared(const int T, const int C, const X8Prep *buf,
                                                                int64_t nb, const QAct *a, int64_t c0, float *out,
                                                                int64_t ldo, int valid)
{
    Tile t = tile_start(C, a, c0);
    for (int64_t b = 0; b < nb; b++) {
        block_x8(T, C, buf + b, b, &t);
        if (X8_INT_SUPER(T) && b % 8 == 7) {
            __m256i mp[4];
            if (X8_MIN_PAIRS(T))
                for (int i = 0; i < 4; i++)
                    mp[i] = buf[b - 7 + 2 * i].mnp;
            super_flush(T, C, buf + b, mp, b - 7, &t);
        }
    }
    tile_store(C, &t, out, c0, ldo, valid);
}

/* Activation rows per pass over a work item's weight groups: as many as fit ACT_CHUNK_BYTES of
 * int8 (a multiple of MAXC, so the tiles, and every result, are those of one pass). Each
 * group reads the chunk's activations; a prompt's whole (512 x 8192 = 4 MB for ffn_down) would
 * come from L3 for every 8 weight rows, a chunk stays in L2 beside the item's weights. */
#ifndef ACT_CHUNK_BYTES
#define ACT_CHUNK_BYTES (256 << 10)
#endif

static inline int64_t act_chunk(int64_t k)
{
    const int64_t rows = ACT_CHUNK_BYTES / k / ACT_G * ACT_G; /* whole groups, so whole tiles */
    return rows > ACT_G ? rows : ACT_G;
}

#define X8_TILE(T, NAME, C)                                                                                 \
    static void NAME##_c##C(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) \
    {                                                                                                       \
        tile_x8(T, C, g, nb, gs, a, c0, o, l, v);                                                           \
    }                                                                                                       \
    static void NAME##_p##C(const X8Prep *buf, int64_t nb, const QAct *a, int64_t c0, float *o, int64_t l, int v) \
    {                                                                                                       \
        if (X8_PREPARED(T))                                                                                 \
            tile_prepared(T, C, buf, nb, a, c0, o, l, v);                                                   \
    }

#if MAXC == 8
#define X8_TILE8(T, NAME) X8_TILE(T, NAME, 8)
#else /* never called: the dispatch below takes 8-row tiles only when MAXC is 8 */
#define X8_TILE8(T, NAME)                                                                                   \
    static void NAME##_c8(const uint8_t *g, int64_t nb, int64_t gs, const QAct *a, int64_t c0, float *o, int64_t l, int v) {} \
    static void NAME##_p8(const X8Prep *buf, int64_t nb, const QAct *a, int64_t c0, float *o, int64_t l, int v) {}
#endif

#define X8_KERNEL(T, NAME)                                                                                  \
    X8_TILE(T, NAME, 1) X8_TILE(T, NAME, 2) X8_TILE(T, NAME, 3) X8_TILE(T, NAME, 4) X8_TILE8(T, NAME)       \
    /* rows r0..r0+nr-1 of an x8 part, r0 a multiple of 8; nb 32-blocks a row */                          \
    static void NAME##_rows(const uint8_t *data, int64_t r0, int64_t nr, int64_t nb, const QAct *a, float *out, int64_t ldo) \
    {                                                                                                       \
        const int64_t gs = nb * QK / qformat(T)->block * x8_record(T);                                      \
        const int64_t chunk = act_chunk(a->k);                                                              \
        for (int64_t cc = 0; cc < a->n; cc += chunk) {                                                      \
            const int64_t ce = a->n - cc < chunk ? a->n : cc + chunk;                                       \
            for (int64_t r = 0; r < nr; r += X8) {                                                          \
                const uint8_t *g = data + (r0 + r) / X8 * gs;                                               \
                const int v = nr - r < X8 ? (int)(nr - r) : X8;                                             \
                if (X8_PREPARED(T) && ce - cc >= X8_PREP_ROWS) {                                            \
                    X8Prep *buf = ops_thread_scratch((size_t)nb * sizeof(X8Prep));                          \
                    if (buf) {                                                                              \
                        group_prep(T, g, nb, buf);                                                          \
                        for (int64_t c0 = cc, cn; c0 < ce; c0 += cn) {                                      \
                            cn = ce - c0;                                                                   \
                            if (MAXC == 8 && cn >= 8) cn = 8, NAME##_p8(buf, nb, a, c0, out + r, ldo, v);   \
                            else if (cn >= 4) cn = 4, NAME##_p4(buf, nb, a, c0, out + r, ldo, v);           \
                            else if (cn == 3) NAME##_p3(buf, nb, a, c0, out + r, ldo, v);                   \
                            else if (cn == 2) NAME##_p2(buf, nb, a, c0, out + r, ldo, v);                   \
                            else NAME##_p1(buf, nb, a, c0, out + r, ldo, v);                                \
                        }                                                                                   \
                        continue;                                                                           \
                    }                                                                                       \
                }                                                                                           \
                /* tiles of MAXC rows, then 4 and the rest: chunks are whole ACT_G groups, so a  \
                 * tile never crosses one */                                                        \
                for (int64_t c0 = cc, cn; c0 < ce; c0 += cn) {                                              \
                    cn = ce - c0;                                                                           \
                    if (MAXC == 8 && cn >= 8) cn = 8, NAME##_c8(g, nb, gs, a, c0, out + r, ldo, v);         \
                    else if (cn >= 4) cn = 4, NAME##_c4(g, nb, gs, a, c0, out + r, ldo, v);                 \
                    else if (cn == 3) NAME##_c3(g, nb, gs, a, c0, out + r, ldo, v);                         \
                    else if (cn == 2) NAME##_c2(g, nb, gs, a, c0, out + r, ldo, v);                         \
                    else NAME##_c1(g, nb, gs, a, c0, out + r, ldo, v);                                      \
                }                                                                                           \
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

/* rows r0 .. r0 + nr - 1 of an x8 part of type qtype */
static void x8_rows(int qtype, const uint8_t *data, int64_t r0, int64_t nr, int64_t nb, const QAct *a, float *o, int64_t ldo)
{
    switch (qtype) {
    case QT_Q4_0: x8_q4_0_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q4_1: x8_q4_1_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q5_0: x8_q5_0_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q5_1: x8_q5_1_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q8_0: x8_q8_0_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q2_K: x8_q2_k_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q3_K: x8_q3_k_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q4_K: x8_q4_k_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q5_K: x8_q5_k_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_Q6_K: x8_q6_k_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_IQ4_NL: x8_iq4_nl_rows(data, r0, nr, nb, a, o, ldo); break;
    case QT_IQ4_XS: x8_iq4_xs_rows(data, r0, nr, nb, a, o, ldo); break;
    default: break; /* rejected when the matrix was built */
    }
}

#endif
