/* ops_avx2: quantized matrix products and small decode ops for the CPU backend.
 *
 * Shared declarations of the kernel files (compiled for AVX2 + FMA + F16C through
 * `#pragma GCC target`) and the Python glue in module.c (compiled for the baseline
 * x86-64, so importing the module and asking `have_avx2()` is safe on any CPU).
 */
#ifndef OPS_AVX2_H
#define OPS_AVX2_H

#include <stddef.h>
#include <stdint.h>

/* GGML type ids (ggml.h / gguf.GGMLQuantizationType) of the block formats with a kernel. */
enum {
    QT_Q4_0 = 2,
    QT_Q4_1 = 3,
    QT_Q5_0 = 6,
    QT_Q5_1 = 7,
    QT_Q8_0 = 8,
    QT_Q2_K = 10,
    QT_Q3_K = 11,
    QT_Q4_K = 12,
    QT_Q5_K = 13,
    QT_Q6_K = 14,
    QT_IQ4_NL = 20,
    QT_IQ4_XS = 23,
};

#define QK 32    /* weights per legacy block, and per activation block */
#define QK_K 256 /* weights per K-quant super-block */

/* Every block type is read in the x8 layout (x8.h has the diagram): 8 rows interleaved unit by
 * unit, a record of 8 * size bytes per block, rows padded to a multiple of 8. */
#define X8 8

/* Block geometry (ggml's): a copy of backends/quants.py's table, checked equal by tests/backends/test_quant_geometry.py. */
typedef struct {
    int qtype;
    int block; /* weights per block: 32, or 256 for the K-quants and IQ4_XS */
    int size;  /* bytes per block */
    int f16[2]; /* file offsets of the fp16 scalars (2-byte units), -1 for none */
} QFormat;

static const QFormat QFORMATS[] = {
    {QT_Q4_0, QK, 18, {0, -1}},      {QT_Q4_1, QK, 20, {0, 2}},      {QT_Q5_0, QK, 22, {0, -1}},
    {QT_Q5_1, QK, 24, {0, 2}},       {QT_Q8_0, QK, 34, {0, -1}},     {QT_Q2_K, QK_K, 84, {80, 82}},
    {QT_Q3_K, QK_K, 110, {108, -1}}, {QT_Q4_K, QK_K, 144, {0, 2}},   {QT_Q5_K, QK_K, 176, {0, 2}},
    {QT_Q6_K, QK_K, 210, {208, -1}}, {QT_IQ4_NL, QK, 18, {0, -1}},   {QT_IQ4_XS, QK_K, 136, {0, 2}},
};

/* a switch, not a search, so that a compile-time type folds to its constants */
static inline const QFormat *qformat(int qtype)
{
    switch (qtype) {
    case QT_Q4_0: return &QFORMATS[0];
    case QT_Q4_1: return &QFORMATS[1];
    case QT_Q5_0: return &QFORMATS[2];
    case QT_Q5_1: return &QFORMATS[3];
    case QT_Q8_0: return &QFORMATS[4];
    case QT_Q2_K: return &QFORMATS[5];
    case QT_Q3_K: return &QFORMATS[6];
    case QT_Q4_K: return &QFORMATS[7];
    case QT_Q5_K: return &QFORMATS[8];
    case QT_Q6_K: return &QFORMATS[9];
    case QT_IQ4_NL: return &QFORMATS[10];
    case QT_IQ4_XS: return &QFORMATS[11];
    default: return NULL;
    }
}

static inline int64_t x8_record(int qtype)
{
    return 8 * (int64_t)qformat(qtype)->size;
}

/* One stored weight matrix (rows, k) in a block format, interleaved by 8 (x8 = 1, the only
 * layout the kernels take; x8.h); row_bytes is a file row's size. */
typedef struct {
    const uint8_t *data;
    int qtype;
    int x8;
    int64_t rows;
    int64_t row_bytes;
} QPart;

/* W = the parts stacked along the output axis (fused q/k/v, gate/up). */
typedef struct {
    int64_t k;    /* input features, a multiple of 32 (256 for K-quants) */
    int64_t rows; /* output features, the sum of the parts' rows */
    int nparts;
    QPart parts[8];
} QMatrix;

/* Activations quantized to int8 (struct of arrays): x[i] ~= d[b] * q[i], q = round-to-even(x * 127 /
 * max|x|), d = max|x| / 127, the max over a scale block of `sblocks` 32-blocks:
 *   1 (32 weights): llama.cpp's Q8_0 / Q8_1, d rounded through fp16 as Q8_0 stores it -- matrices of
 *     32-weight block types;
 *   8 (256 weights): llama.cpp's Q8_K granularity, d in float32 -- matrices with a 256-weight
 *     super-block part (K-quants, IQ4_XS; ops_act_sblocks), whose AVX2 kernels then sum a
 *     super-block's 8 blocks in int32 and scale once (x8_kernels.h). d is stored for every 32-block
 *     all the same, so every kernel reads the layout alike.
 *
 * Rows are interleaved in groups of g = ACT_G (all n when fewer), block by block (act_at): the
 * entries of a group's rows for block b are adjacent, and so are their 32-byte q blocks. A
 * kernel tile of up to 8 rows inside one group then reads everything at constant offsets from
 * one pointer per block; with one row-major pointer per row, eight rows' addresses spilled.
 * (A lone row keeps its blocks contiguous: spread 8 apart, decode's activations took 8x the
 * cache lines, Q8_0 at one row 10-14 % slower.) */
#define ACT_G 8
typedef struct {
    int64_t n, k, nb; /* rows, features, blocks per row (k / 32); storage padded to whole groups */
    int64_t g;        /* rows a group */
    int64_t sblocks;  /* 32-blocks per scale: 1 or 8 (above) */
    int8_t *q;        /* block (i, b): the 32 bytes at q + 32 * act_at(i, b) */
    float *d;         /* [act_at(i, b)] scale (the same for the sblocks blocks of a scale block) */
    float *s;         /* [..] d * sum(q): the block sum for Q4_1's min term (llama.cpp's Q8_1
                       * rounds it to fp16, a 2e-3 relative error in Q4_1 outputs not copied here) */
    int32_t *isum;    /* [..] sum(q), exact: weights' offsets, K-quant mins */
    int32_t *halves;  /* [..] the sums of the block's two 16-weight halves as int16 (first in the low
                       * half): one madd with a 16-weight sub-block pair (offsets, mins) */
    int32_t *off6;    /* [2 at], [2 at + 1]: -32 times each half's sum, where the VNNI Q6_K kernel
                       * starts its two accumulators (its offset of 32, no work per row) */
    int32_t *pairs;   /* [at] of an even block b: the sums of blocks b and b + 1 as int16 (b's in
                       * the low half): one madd with two blocks' mins (Q4_K, Q5_K) */
} QAct;

/* where (row i, 32-block b) of a QAct sits: index into d, s, isum, halves (off6 at 2x); q at 32x this */
static inline int64_t act_at(const QAct *a, int64_t i, int64_t b)
{
    return (i / a->g * a->nb + b) * a->g + i % a->g;
}

int ops_cpu_has_avx2(void);
int ops_cpu_has_vnni(void); /* AVX512-VNNI and AVX512-VL: the vpdpbusd kernels (qmatmul_vnni.c) */
int ops_use_vnni(int on);   /* use them if on and the CPU has them; returns whether they are used */
int ops_part_supported(int qtype);
int64_t ops_row_bytes(int qtype, int64_t k);

/* thread pool (threadpool.c): fn(ctx, i) for i = 0..n-1 on the caller and up to nth - 1 workers */
typedef void (*ops_task_fn)(void *ctx, int64_t i);
void ops_parallel_for(int64_t n, int nth, ops_task_fn fn, void *ctx);
void ops_set_spin_us(long us);
void ops_park(void);
/* A spinning pool worker prefetches the n ranges [p[i], p[i] + len[i]) until the next pool
 * task starts or the pool is parked (a hint: dropped when no worker takes it before the next
 * task). Callers that run on one thread do not post. Prefetch instructions never fault, so a
 * range unmapped meanwhile (a model unloaded) is harmless. */
void ops_prefetch_async(int n, const void *const *p, const int64_t *len);
/* The calling thread's scratch of at least `bytes`, 64-byte aligned, kept (and grown) for the
 * thread's life and freed when it exits; NULL if it cannot be had (callers fall back). */
void *ops_thread_scratch(size_t bytes);

/* kernels (AVX2) */
void ops_quantize_act(const float *x, int64_t ldx, QAct *a, int nthreads);
int64_t ops_act_sblocks(const QMatrix *w); /* the scale block (QAct.sblocks) w's activations take */
/* a quantized with a->sblocks = ops_act_sblocks(w): the AVX2 super-block kernels read one scale a
 * super-block (module.c's int8_matmul, the one caller, sets it) */
void ops_matmul(const QMatrix *w, const QAct *a, float *out, int64_t ldo, int nthreads);
void ops_x8_rows_vnni(int qtype, const uint8_t *data, int64_t r0, int64_t nr, int64_t nb, const QAct *a, float *o,
                      int64_t ldo);
void ops_dequantize(const QMatrix *w, int64_t row0, int64_t row1, float *out, int nthreads);
void ops_quantize_q8_0(const float *x, int64_t n, uint8_t *out, int nthreads);
void ops_repack_x8(int qtype, const uint8_t *src, int64_t rows, int64_t k, uint8_t *dst, int nthreads);
int64_t ops_x8_bytes(int qtype, int64_t rows, int64_t k);
int ops_x8_supported(int qtype);
void ops_dequantize_ids(const QMatrix *w, const int64_t *ids, int64_t n, float *out);

/* float32 matmul (fmatmul.c), out (m, n) = x (m, k) @ W.T, batch-invariant; strides in floats.
 * nk: W (n, k) row-major with row stride ldw (the backend's resident layout, the tied head's
 * table). kn: the same product from Wt = W.T (k, n) row-major with row stride ldw. */
void ops_matmul_f32_nk(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t m, int64_t k, int64_t n,
                       float *out, int64_t ldo, int nthreads);
void ops_matmul_f32_kn(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t m, int64_t k, int64_t n,
                       float *out, int64_t ldo, int nthreads);

/* decoder-layer ops (ops.c); strides are in floats */
void ops_rms_norm(const float *x, int64_t ldx, const float *w, int64_t n, int64_t d, float eps, float *out);
void ops_rope(const float *x, int64_t sx_row, int64_t sx_head, int64_t n, int64_t heads, int64_t hd,
              const float *cos_t, const float *sin_t, int64_t half, const int64_t *pos, int neox, float *out);
void ops_silu_mul(const float *gu, int64_t ld, int64_t n, int64_t f, float *out, int nthreads);
double ops_logsumexp(const float *x, int64_t d);
void ops_attention(const float *q, const float *k, int64_t sk_head, const float *v, int64_t sv_head,
                   const int64_t *pos, int64_t n, int64_t heads, int64_t n_kv, int64_t t, int64_t hd,
                   float *out, int nthreads);
void ops_decode_attention(const float *q, const float *k, int64_t sk_seq, int64_t sk_head, const float *v,
                          int64_t sv_seq, int64_t sv_head, const int64_t *last, int64_t b, int64_t heads,
                          int64_t n_kv, int64_t t, int64_t hd, float *out, int nthreads);
void ops_paged_decode_attention(const float *q, const float *k, const float *v, int64_t blocks, int64_t block,
                                const int64_t *table, int64_t nb, const int64_t *last, int64_t b, int64_t heads,
                                int64_t n_kv, int64_t hd, float *out, int nthreads);

#endif
