/* Float32 matrix products out = x @ W for the CPU backend's f32 weights, AVX2 + FMA.
 *
 * Why not OpenBLAS for every batch: at the 2..32-row batches of continuous-batching decode
 * its GEMM packs both operands on every call and takes 2.4x the time of a 1-row GEMV over the
 * same weights, though the weights' read from memory is most of the work either way; and its
 * results depend on the batch (it picks kernels by shape), which batch-invariant mode had to
 * work around with fixed 4-row tiles (invariant.py, 5x slower).
 *
 * Two weight layouts, both read in place:
 *  - "nk", W (N, K) row-major, passed as the (K, N) view W.T: the backend's resident layout
 *    (the file's own orientation, and the tied head's embedding table). A tile of R activation
 *    rows x T weight rows keeps R * T 8-lane partial dot products in registers. W's rows are
 *    contiguous, so a task's rows stream from memory as one sequence; with several row groups
 *    (M > 6) every group passes over a ~64 KB sub-block while it is in L2, so the weights come
 *    from memory once per call whatever the batch.
 *  - "kn", Wt (K, N) row-major: a tile of R rows x V vectors of 8 output columns, broadcasting
 *    x[r, k] against Wt[k]. A column strip of Wt is strided by N floats, which both defeats the
 *    hardware prefetcher and, when N * 4 is a multiple of 4 KB, maps every row of a strip to
 *    the same cache set: one row group (M <= 6) sweeps 8-row blocks across 512 columns, several
 *    copy each 128 x 128 panel into a per-thread buffer first. At 2..32 rows this layout
 *    measured 1.1-1.5x slower than nk, which is why the backend keeps W (N, K).
 *
 * Batch invariance by construction: every output element is one fixed chain of operations
 * over k. nk: lane l of the accumulator does acc = fma(x[i], w[i], acc) for i = l, l+8, ... in
 * order from 0, then hsum8's fixed tree; kn: acc = fma(x[k], w[k], acc) for k = 0..K-1 in
 * order from 0 (k blocks store and reload the partial sums, which is exact). Tile shapes, row
 * grouping, tasks and threads only decide how many chains run side by side, never their
 * arithmetic; tails use masked loads and stores of the same lanes (a masked-off k adds
 * fma(0, 0, acc) = acc). So a row's bits depend neither on M nor on its batch mates. (The two
 * layouts sum in different orders: each is invariant, their bits differ from each other.)
 */
#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC target("avx2,fma")

#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops_avx2.h"
#include "simd.h"

#define MAXR 6 /* activation rows per tile; a batch is split into ceil(M / 6) near-equal groups */
#define MAXT 8 /* nk: weight rows per tile */
#define MAXV 8 /* kn: output vectors (8 columns) per tile */

/* Tile widths by rows: R * T (R * V) accumulators, plus the T (V) weight vectors and one x
 * vector, in the 16 ymm registers; one row streams 8 weight rows as FMA memory operands. */
static const int NK_T[MAXR + 1] = {0, 8, 5, 3, 3, 2, 2};
static const int KN_V[MAXR + 1] = {0, 8, 5, 4, 3, 2, 2};

/* Measured on the 2-core Zen 2 this was written on (whole-model step, see the backend). */
#define NK_TASK 128      /* nk: weight rows per task, about: 6..384 tasks for 576..49152 rows */
#define NK_SUB 65536     /* nk: bytes of W every row group passes over while it is in L2 */
#define NK_PF_ROWS 8     /* nk: the first group prefetches W this many rows ahead */
#define KN_DIRECT_K 8    /* kn, one group: k rows per sweep across the task's columns */
#define KN_DIRECT_N 512  /* kn, one group: columns per task, about */
#define KN_DIRECT_PF 16  /* kn, one group: prefetch this many k rows ahead */
#define KN_PANEL_K 128   /* kn, several groups: the packed panel's k rows */
#define KN_PANEL_N 128   /* kn, several groups: the packed panel's columns (per task) */
#define KN_PANEL_PF 4    /* kn packing: prefetch this many rows ahead */

static const int32_t MASK_SRC[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* the first n (0..8) lanes */
static inline __m256i first_lanes(int64_t n)
{
    return _mm256_loadu_si256((const __m256i *)(MASK_SRC + 8 - n));
}

static inline int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* ---- nk: W (N, K), out[r, j] = dot(x[r], W[j]) ---- */

/* out[r, 0:T] for R rows against T rows of w. With `pf`, the rows that many floats further
 * on are prefetched, one line per row every 16 floats. */
static inline __attribute__((always_inline)) void tile_nk(
    const int R, const int T, const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t k,
    float *out, int64_t ldo, int64_t pf)
{
    __m256 acc[MAXR][MAXT];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            acc[r][t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        if (pf && i % 16 == 0) {
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                _mm_prefetch((const char *)(w + pf + t * ldw + i), _MM_HINT_T0);
        }
        /* the T weight vectors in registers, each x vector loaded once: R + T loads per R * T FMAs */
        __m256 wv[MAXT];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            wv[t] = _mm256_loadu_ps(w + t * ldw + i);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_loadu_ps(x + r * ldx + i);
            __asm__("" : "+x"(xv)); /* keep it in a register: GCC folds it into every FMA and runs out of loads */
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                acc[r][t] = _mm256_fmadd_ps(xv, wv[t], acc[r][t]);
        }
    }
    if (i < k) {
        const __m256i mask = first_lanes(k - i);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const __m256 wt = _mm256_maskload_ps(w + t * ldw + i, mask);
#pragma GCC unroll 6
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(_mm256_maskload_ps(x + r * ldx + i, mask), wt, acc[r][t]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            out[r * ldo + t] = hsum8(acc[r][t]);
}

typedef void (*nk_fn)(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t k, float *out, int64_t ldo,
                      int64_t pf);

#define NK(R, T)                                                                                              \
    static void nk_##R##_##T(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t k, float *out,  \
                             int64_t ldo, int64_t pf)                                                         \
    {                                                                                                         \
        tile_nk(R, T, x, ldx, w, ldw, k, out, ldo, pf);                                                       \
    }
#define NK_ENTRY(R, T) [R][T] = nk_##R##_##T

NK(1, 1) NK(1, 2) NK(1, 3) NK(1, 4) NK(1, 5) NK(1, 6) NK(1, 7) NK(1, 8)
NK(2, 1) NK(2, 2) NK(2, 3) NK(2, 4) NK(2, 5)
NK(3, 1) NK(3, 2) NK(3, 3)
NK(4, 1) NK(4, 2) NK(4, 3)
NK(5, 1) NK(5, 2)
NK(6, 1) NK(6, 2)

/* [R][T]: T <= NK_T[R] */
static const nk_fn NK_TABLE[MAXR + 1][MAXT + 1] = {
    NK_ENTRY(1, 1), NK_ENTRY(1, 2), NK_ENTRY(1, 3), NK_ENTRY(1, 4), NK_ENTRY(1, 5), NK_ENTRY(1, 6),
    NK_ENTRY(1, 7), NK_ENTRY(1, 8), NK_ENTRY(2, 1), NK_ENTRY(2, 2), NK_ENTRY(2, 3), NK_ENTRY(2, 4),
    NK_ENTRY(2, 5), NK_ENTRY(3, 1), NK_ENTRY(3, 2), NK_ENTRY(3, 3), NK_ENTRY(4, 1), NK_ENTRY(4, 2),
    NK_ENTRY(4, 3), NK_ENTRY(5, 1), NK_ENTRY(5, 2), NK_ENTRY(6, 1), NK_ENTRY(6, 2),
};

/* Rows are split into ceil(m / MAXR) groups of near-equal size (32 -> 6,6,5,5,5,5; 8 -> 4,4),
 * so every group fits the tile width of the largest. */
typedef struct {
    const float *x, *w;
    int64_t ldx, ldw, m, k, n;
    float *out;
    int64_t ldo;
    int ngroups, t;    /* row groups, weight rows per tile */
    int64_t task_rows; /* weight rows per task, whole tiles */
    int64_t sub_rows;  /* weight rows every group passes over in turn, whole tiles */
} NkCtx;

static void nk_task(void *p, int64_t task)
{
    const NkCtx *c = p;
    const int64_t j0 = task * c->task_rows, j1 = min64(j0 + c->task_rows, c->n);
    const int64_t base = c->m / c->ngroups, extra = c->m % c->ngroups;
    for (int64_t s0 = j0; s0 < j1; s0 += c->sub_rows) {
        const int64_t s1 = min64(s0 + c->sub_rows, j1);
        int64_t r0 = 0;
        for (int g = 0; g < c->ngroups; g++) {
            const int r = (int)(base + (g < extra));
            for (int64_t j = s0; j < s1; j += c->t) {
                const int t = (int)min64(s1 - j, c->t);
                /* the first group reads the rows from memory: it prefetches ahead, the rest hit L2 */
                const int64_t pf = g == 0 && j + NK_PF_ROWS + t <= c->n ? NK_PF_ROWS * c->ldw : 0;
                NK_TABLE[r][t](c->x + r0 * c->ldx, c->ldx, c->w + j * c->ldw, c->ldw, c->k, c->out + r0 * c->ldo + j,
                               c->ldo, pf);
            }
            r0 += r;
        }
    }
}

void ops_matmul_f32_nk(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t m, int64_t k, int64_t n,
                       float *out, int64_t ldo, int nthreads)
{
    if (m <= 0 || n <= 0)
        return;
    NkCtx c = {.x = x, .w = w, .ldx = ldx, .ldw = ldw, .m = m, .k = k, .n = n, .out = out, .ldo = ldo};
    c.ngroups = (int)((m + MAXR - 1) / MAXR);
    c.t = NK_T[(m + c.ngroups - 1) / c.ngroups];
    const int64_t row_bytes = (k > 0 ? k : 1) * (int64_t)sizeof(float);
    c.sub_rows = (NK_SUB / row_bytes + c.t - 1) / c.t * c.t;
    if (c.sub_rows < c.t)
        c.sub_rows = c.t;
    /* near-equal tasks, a multiple of the threads in number */
    const int64_t nth = nthreads > 1 ? nthreads : 1;
    const int64_t ntasks = (n + nth * NK_TASK - 1) / (nth * NK_TASK) * nth;
    c.task_rows = ((n + ntasks - 1) / ntasks + c.t - 1) / c.t * c.t;
    /* below ~32k multiply-adds a second thread costs more than it saves */
    ops_parallel_for((n + c.task_rows - 1) / c.task_rows, m * n * k >= (1 << 15) ? nthreads : 1, nk_task, &c);
}

/* ---- kn: Wt (K, N), out[r, :] = sum_k x[r, k] * Wt[k, :] ---- */

/* out[r, 0:8V] for R rows over kn rows of w (x and w already at the first of them); with
 * `first` the sums start from 0, else from out's partial sums. `tail`: the last vector has
 * only the lanes of `mask`. With `pw`, the lines at pw + k * ldpw are prefetched. */
static inline __attribute__((always_inline)) void tile_kn(
    const int R, const int V, const int tail, const float *x, int64_t ldx, const float *w, int64_t ldw,
    int64_t kn, int first, float *out, int64_t ldo, __m256i mask, const float *pw, int64_t ldpw)
{
    __m256 acc[MAXR][MAXV];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int v = 0; v < V; v++) {
            if (first)
                acc[r][v] = _mm256_setzero_ps();
            else if (tail && v == V - 1)
                acc[r][v] = _mm256_maskload_ps(out + r * ldo + 8 * v, mask);
            else
                acc[r][v] = _mm256_loadu_ps(out + r * ldo + 8 * v);
        }
    const float *wk = w;
    for (int64_t k = 0; k < kn; k++, wk += ldw) {
        if (pw) { /* every line of the strip, which need not start on one */
#pragma GCC unroll 8
            for (int v = 0; v < V; v += 2)
                _mm_prefetch((const char *)(pw + k * ldpw + 8 * v), _MM_HINT_T0);
            _mm_prefetch((const char *)(pw + k * ldpw + 8 * V - 1), _MM_HINT_T0);
        }
        __m256 wv[MAXV];
#pragma GCC unroll 8
        for (int v = 0; v < V; v++)
            wv[v] = tail && v == V - 1 ? _mm256_maskload_ps(wk + 8 * v, mask) : _mm256_loadu_ps(wk + 8 * v);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            const __m256 xr = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 8
            for (int v = 0; v < V; v++)
                acc[r][v] = _mm256_fmadd_ps(xr, wv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int v = 0; v < V; v++) {
            if (tail && v == V - 1)
                _mm256_maskstore_ps(out + r * ldo + 8 * v, mask, acc[r][v]);
            else
                _mm256_storeu_ps(out + r * ldo + 8 * v, acc[r][v]);
        }
}

typedef void (*kn_fn)(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t kn, int first, float *out,
                      int64_t ldo, __m256i mask, const float *pw, int64_t ldpw);

#define KN(R, V)                                                                                              \
    static void kn_##R##_##V(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t kn, int first,  \
                             float *out, int64_t ldo, __m256i mask, const float *pw, int64_t ldpw)              \
    {                                                                                                         \
        tile_kn(R, V, 0, x, ldx, w, ldw, kn, first, out, ldo, mask, pw, ldpw);                                \
    }                                                                                                         \
    static void kn_##R##_##V##_t(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t kn,         \
                                 int first, float *out, int64_t ldo, __m256i mask, const float *pw,             \
                                 int64_t ldpw)                                                                \
    {                                                                                                         \
        tile_kn(R, V, 1, x, ldx, w, ldw, kn, first, out, ldo, mask, pw, ldpw);                                \
    }
#define KN_ENTRY(R, V) [R][V] = {kn_##R##_##V, kn_##R##_##V##_t}

KN(1, 1) KN(1, 2) KN(1, 3) KN(1, 4) KN(1, 5) KN(1, 6) KN(1, 7) KN(1, 8)
KN(2, 1) KN(2, 2) KN(2, 3) KN(2, 4) KN(2, 5)
KN(3, 1) KN(3, 2) KN(3, 3) KN(3, 4)
KN(4, 1) KN(4, 2) KN(4, 3)
KN(5, 1) KN(5, 2)
KN(6, 1) KN(6, 2)

/* [R][V][tail]: V <= KN_V[R] */
static const kn_fn KN_TABLE[MAXR + 1][MAXV + 1][2] = {
    KN_ENTRY(1, 1), KN_ENTRY(1, 2), KN_ENTRY(1, 3), KN_ENTRY(1, 4), KN_ENTRY(1, 5), KN_ENTRY(1, 6),
    KN_ENTRY(1, 7), KN_ENTRY(1, 8), KN_ENTRY(2, 1), KN_ENTRY(2, 2), KN_ENTRY(2, 3), KN_ENTRY(2, 4),
    KN_ENTRY(2, 5), KN_ENTRY(3, 1), KN_ENTRY(3, 2), KN_ENTRY(3, 3), KN_ENTRY(3, 4), KN_ENTRY(4, 1),
    KN_ENTRY(4, 2), KN_ENTRY(4, 3), KN_ENTRY(5, 1), KN_ENTRY(5, 2), KN_ENTRY(6, 1), KN_ENTRY(6, 2),
};

/* The panel buffer, one per thread (pool workers and callers), freed when its thread exits.
 * Strips are padded to whole vectors: at most one strip of MAXV vectors more than the panel. */
#define PANEL_FLOATS ((size_t)KN_PANEL_K * (KN_PANEL_N + 8 * MAXV))

static pthread_key_t panel_key;
static pthread_once_t panel_once = PTHREAD_ONCE_INIT;

static void panel_key_init(void)
{
    pthread_key_create(&panel_key, free);
}

static float *panel_buffer(void)
{
    pthread_once(&panel_once, panel_key_init);
    float *buf = pthread_getspecific(panel_key);
    if (!buf) {
        buf = aligned_alloc(64, PANEL_FLOATS * sizeof(float));
        if (buf && pthread_setspecific(panel_key, buf) != 0) {
            free(buf);
            buf = NULL;
        }
    }
    return buf;
}

/* W[0:kn, 0:cols] -> buf, strip after strip, each strip (kn, sw) contiguous; lanes past cols
 * are zeros (the kernel masks them anyway). Rows are read whole, in order. */
static void pack_panel(const float *w, int64_t ldw, int64_t kn, int64_t cols, int64_t sw, float *buf)
{
    const __m256i mask = first_lanes(cols % 8);
    for (int64_t k = 0; k < kn; k++) {
        const float *wk = w + k * ldw;
        for (int64_t col = 0; col < cols; col += 16)
            _mm_prefetch((const char *)(wk + KN_PANEL_PF * ldw + col), _MM_HINT_T0);
        float *dst = buf + k * sw;
        int64_t col = 0, off = 0; /* off: col within its strip */
        for (; col + 8 <= cols; col += 8) {
            _mm256_store_ps(dst + off, _mm256_loadu_ps(wk + col));
            off += 8;
            if (off == sw) {
                off = 0;
                dst += kn * sw;
            }
        }
        if (col < cols)
            _mm256_store_ps(dst + off, _mm256_maskload_ps(wk + col, mask));
    }
}

typedef struct {
    const float *x, *w;
    int64_t ldx, ldw, m, k, n;
    float *out;
    int64_t ldo;
    int ngroups, v;    /* row groups, vectors per strip */
    int panels;        /* several groups: copy each panel to the thread's buffer first */
    int64_t task_cols; /* a multiple of 8 */
    int64_t kc;        /* k rows per block */
} KnCtx;

static void kn_task(void *p, int64_t t)
{
    const KnCtx *c = p;
    const int64_t sw = 8 * c->v;
    const int64_t c0 = t * c->task_cols, c1 = min64(c0 + c->task_cols, c->n);
    const int64_t base = c->m / c->ngroups, extra = c->m % c->ngroups;
    /* without a buffer (out of memory) the panels are read in place: slower, same bits */
    float *buf = c->panels ? panel_buffer() : NULL;
    for (int64_t k0 = 0; k0 < c->k; k0 += c->kc) {
        const int64_t kn = min64(c->k - k0, c->kc);
        if (buf)
            pack_panel(c->w + k0 * c->ldw + c0, c->ldw, kn, c1 - c0, sw, buf);
        /* the first group prefetches: packed, the next panel's rows; in place, rows KN_DIRECT_PF on */
        const int64_t ahead = buf ? kn : KN_DIRECT_PF;
        const int prefetch = k0 + ahead + kn <= c->k;
        for (int64_t s = c0; s < c1; s += sw) {
            const int64_t cols = min64(c1 - s, sw);
            const int v = (int)((cols + 7) / 8), tail = cols % 8 != 0;
            const __m256i mask = first_lanes(tail ? cols % 8 : 8);
            const float *w = buf ? buf + (s - c0) * kn : c->w + k0 * c->ldw + s;
            const int64_t ldw = buf ? sw : c->ldw;
            const float *pw = prefetch ? c->w + (k0 + ahead) * c->ldw + s : NULL;
            int64_t r0 = 0;
            for (int g = 0; g < c->ngroups; g++) {
                const int r = (int)(base + (g < extra));
                KN_TABLE[r][v][tail](c->x + r0 * c->ldx + k0, c->ldx, w, ldw, kn, k0 == 0, c->out + r0 * c->ldo + s,
                                     c->ldo, mask, g == 0 ? pw : NULL, c->ldw);
                r0 += r;
            }
        }
    }
}

void ops_matmul_f32_kn(const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t m, int64_t k, int64_t n,
                       float *out, int64_t ldo, int nthreads)
{
    if (m <= 0 || n <= 0)
        return;
    if (k <= 0) { /* an empty sum */
        for (int64_t r = 0; r < m; r++)
            memset(out + r * ldo, 0, (size_t)n * sizeof(float));
        return;
    }
    KnCtx c = {.x = x, .w = w, .ldx = ldx, .ldw = ldw, .m = m, .k = k, .n = n, .out = out, .ldo = ldo};
    c.ngroups = (int)((m + MAXR - 1) / MAXR);
    c.v = KN_V[(m + c.ngroups - 1) / c.ngroups];
    c.panels = c.ngroups > 1;
    c.kc = c.panels ? KN_PANEL_K : KN_DIRECT_K;
    const int64_t cols = c.panels ? KN_PANEL_N : KN_DIRECT_N;
    /* near-equal tasks of whole vectors, a multiple of the threads in number */
    const int64_t nth = nthreads > 1 ? nthreads : 1;
    const int64_t ntasks = (n + nth * cols - 1) / (nth * cols) * nth;
    c.task_cols = min64(((n + ntasks - 1) / ntasks + 7) / 8 * 8, cols);
    /* below ~32k multiply-adds a second thread costs more than it saves */
    ops_parallel_for((n + c.task_cols - 1) / c.task_cols, m * n * k >= (1 << 15) ? nthreads : 1, kn_task, &c);
}

#endif /* x86-64 */
