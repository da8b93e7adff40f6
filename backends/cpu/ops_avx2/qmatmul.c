/* Quantized matrix products out = x @ W.T with W in GGML blocks, AVX2 + FMA + F16C.
 *
 * As llama.cpp does: each activation row is quantized per 32-block to int8 with one
 * scale (ops_quantize_act), then every (weight block, activation block) pair is an
 * integer dot product -- _mm256_maddubs_epi16 (u8 x s8 -> pairs summed in s16) and
 * _mm256_madd_epi16 (-> s32) -- scaled in float by d_w * d_x and accumulated.
 *
 * Every block type is read in the x8 layout (x8.h, repacked at load): 8 weight rows per
 * register, one output row per lane, one kernel (tile_x8) instantiated per type. It computes
 * its rows against up to C activation rows at once (4 on AVX2, 8 with AVX512-VNNI), so a
 * weight block is loaded and unpacked once per C tokens of a batch; the activations are
 * stored interleaved for those tiles (QAct, ops_avx2.h).
 * Threads (threadpool.c) take tiles of ROW_TILE output rows (longer for one token: RUNS
 * below) from a shared counter; each writes its own outputs, no reduction, so results depend
 * neither on the thread count nor on a row's batch mates.
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
 * the block sum, kept in float32 where Q8_1 rounds it to fp16; or one scale per 256 weights,
 * Q8_K's granularity: QAct in ops_avx2.h) ---- */

static inline __m256i round_i32(__m256 v, __m256 mul)
{
    return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* row i of a from x */
static void quantize_act_row(const float *x, QAct *a, int64_t i)
{
    const int64_t nb = a->nb, per = a->sblocks;
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b0 = 0; b0 < nb; b0 += per) {
        __m256 amax = _mm256_setzero_ps();
        for (int64_t e = 32 * b0; e < 32 * (b0 + per); e += 8)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + e)));
        const float max_scalar = hmax8(amax);
        const float dd = max_scalar / 127.f;
        const float id = max_scalar != 0.0f ? 127.f / max_scalar : 0.0f;
        const float d = per == 1 ? fp16_round(dd) : dd;
        const __m256 mul = _mm256_set1_ps(id);
        for (int64_t b = b0; b < b0 + per; b++) {
            __m256i i0 = round_i32(_mm256_loadu_ps(x + 32 * b), mul);
            __m256i i1 = round_i32(_mm256_loadu_ps(x + 32 * b + 8), mul);
            __m256i i2 = round_i32(_mm256_loadu_ps(x + 32 * b + 16), mul);
            __m256i i3 = round_i32(_mm256_loadu_ps(x + 32 * b + 24), mul);
            const int32_t sum16 = hsum_i32(_mm256_add_epi32(i0, i1));
            const int32_t sum = sum16 + hsum_i32(_mm256_add_epi32(i2, i3));
            /* pack 4 x 8 int32 -> 32 int8; packs work per 128-bit lane, the permute restores the order */
            i0 = _mm256_packs_epi32(i0, i1);
            i2 = _mm256_packs_epi32(i2, i3);
            i0 = _mm256_packs_epi16(i0, i2);
            i0 = _mm256_permutevar8x32_epi32(i0, perm);
            const int64_t at = act_at(a, i, b);
            _mm256_storeu_si256((__m256i *)(a->q + 32 * at), i0);
            a->d[at] = d;
            a->s[at] = d * (float)sum;
            a->isum[at] = sum;
            a->halves[at] = (int32_t)(((uint32_t)(sum - sum16) << 16) | ((uint32_t)sum16 & 0xFFFF));
            a->off6[2 * at] = -32 * sum16;
            a->off6[2 * at + 1] = -32 * (sum - sum16);
            if (b & 1) {
                const int64_t even = act_at(a, i, b - 1);
                a->pairs[even] = (int32_t)(((uint32_t)sum << 16) | ((uint32_t)a->isum[even] & 0xFFFF));
            }
        }
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
    quantize_act_row(c->x + i * c->ldx, c->a, i);
}

int64_t ops_act_sblocks(const QMatrix *w)
{
    for (int p = 0; p < w->nparts; p++)
        if (qformat(w->parts[p].qtype)->block == QK_K)
            return QK_K / QK;
    return 1;
}

void ops_quantize_act(const float *x, int64_t ldx, QAct *a, int nthreads)
{
    QuantizeCtx c = {x, ldx, a};
    ops_parallel_for(a->n, a->n * a->k >= (1 << 16) ? nthreads : 1, quantize_task, &c);
}

#include "x8_kernels.h"

/* AVX512-VNNI (vpdpbusd) where the CPU has it: the same arithmetic, exact in int32, so the
 * same results bit for bit (qmatmul_vnni.c); ops_use_vnni turns it off for tests. */
static int g_vnni = -1;

int ops_use_vnni(int on)
{
    g_vnni = on && ops_cpu_has_vnni();
    return g_vnni;
}

/* Rows per work item: long enough runs of rows for each thread's prefetch stream (16-row
 * items measured 3-10 % slower at decode), small enough to split a 192-row matrix. */
#ifndef ROW_TILE
#define ROW_TILE 64
#endif
/* One token (decode streams every weight from memory): items of rows / (RUNS * threads), so each
 * thread reads a few long runs of rows. With 64-row items taken in turn, a thread's prefetch
 * (PF_GROUPS ahead, 8 groups then) fell into the next item, mostly the other thread's -- into the
 * wrong core's L2, as we read it (no counters here to confirm). The 1B model's matrices at batch 1
 * (weight_sweep.py, 7 rounds): Q6_K 55.7 -> 34.4 ms, Q4_K_M 26.0 -> 25.4; tg 64 tokens, 12
 * interleaved rounds: Q6_K 24.4 -> 31.0 tok/s (medians; 64-row items read 20.0-33.0, bimodal),
 * Q4_K_M 39.1 -> 42.4; 2 runs a thread measured the same (7 rounds: 33.6, 41.8) and 4 keep a
 * descheduled thread's share smaller. (Reading ahead the
 * second item, the worker's, instead of the first: not better, 5 rounds.) */
#ifndef RUNS
#define RUNS 4
#endif

typedef struct {
    const QMatrix *w;
    const QAct *a;
    float *out;
    int64_t ldo;
    int64_t first_tile[9]; /* of each part, then the total */
    int64_t first_col[8];  /* output column of each part */
    int64_t tile;          /* rows per work item */
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
    const int64_t r0 = (t - c->first_tile[p]) * c->tile;
    const int64_t nr = part->rows - r0 < c->tile ? part->rows - r0 : c->tile;
    float *o = c->out + c->first_col[p] + r0;
#if defined(__GNUC__)
    if (g_vnni) {
        ops_x8_rows_vnni(part->qtype, part->data, r0, nr, nb, a, o, ldo);
        return;
    }
#endif
    x8_rows(part->qtype, part->data, r0, nr, nb, a, o, ldo);
}


void ops_matmul(const QMatrix *w, const QAct *a, float *out, int64_t ldo, int nthreads)
{
    if (g_vnni < 0)
        ops_use_vnni(1);
    MatmulCtx c = {.w = w, .a = a, .out = out, .ldo = ldo, .tile = ROW_TILE};
    if (a->n == 1 && nthreads > 1) {
        const int64_t tile = w->rows / (RUNS * nthreads) / ROW_TILE * ROW_TILE;
        c.tile = tile > ROW_TILE ? tile : ROW_TILE;
    }
    int64_t ntiles = 0, col = 0;
    for (int p = 0; p < w->nparts; p++) {
        c.first_tile[p] = ntiles;
        c.first_col[p] = col;
        ntiles += (w->parts[p].rows + c.tile - 1) / c.tile;
        col += w->parts[p].rows;
    }
    c.first_tile[w->nparts] = ntiles;
    /* below ~32k multiply-adds a second thread costs more than it saves */
    ops_parallel_for(ntiles, a->n * w->rows * w->k >= (1 << 15) ? nthreads : 1, matmul_task, &c);
}

#endif /* x86-64 */
