/* What this CPU's int8 multiply pipe allows, measured rather than taken from a table.
 *
 * Each loop below is the instruction stream of one of our AVX2 x8 kernels (x8_kernels.h) with every
 * operand in L1 and nothing else around it: no unpacking, no prefetch, no super-block flush, no
 * weights from memory. Its multiply-adds a second is the ceiling the real kernel can approach and
 * not pass.
 *
 *   maddubs  vpmaddubsw alone (int16 adds consume them): the multiply pipe's peak
 *   q4k      Q4_K's block and activation row: 8 broadcasts, 8 maddubs summed in s16, one
 *            madd with the sub-block scales, one int32 add (256 multiply-adds: 8 rows x 32 weights)
 *   q40      Q4_0's: q4k's with ones for the scales, then its offset (8 times the activation
 *            block's sum) and the float epilogue a block and row (convert, d * dy, fma)
 *   q6k      Q6_K's: the same 8 maddubs summed two at a time, four madds with the half's scales,
 *            and the offset's madd, shift and subtract
 *
 * Run by benchmarks/x8_ceiling.py (which builds it) on 1 and 2 threads; prints GMAC/s per loop.
 * Build by hand (the kernels' flags): gcc -O3 -mavx2 -mfma -pthread benchmarks/x8_ceiling.c -o /tmp/x8_ceiling */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ROWS 4              /* activation rows a tile (AVX2's MAXC) */
#define YBYTES 4096         /* activation bytes cycled through: L1 */
#define ITERS (1L << 22)    /* blocks a thread */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static inline __m256i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

typedef struct {
    const char *loop;
    double macs, seconds;
    int32_t sink;
} Job;

static int8_t ybuf[YBYTES + 64] __attribute__((aligned(64)));
static uint8_t wbuf[8 * 32] __attribute__((aligned(64)));

static int32_t fold(__m256i v)
{
    int32_t t[8], s = 0;
    _mm256_storeu_si256((__m256i *)t, v);
    for (int i = 0; i < 8; i++)
        s += t[i];
    return s;
}

/* vpmaddubsw alone: 32 multiply-adds an instruction, 4 independent int16 sums (more spill) */
static __attribute__((noinline)) void loop_maddubs(Job *j)
{
    __m256i w[4], acc[4];
    for (int c = 0; c < 4; c++) {
        w[c] = _mm256_loadu_si256((const __m256i *)wbuf + c);
        acc[c] = _mm256_setzero_si256();
    }
    double t0 = now();
    long at = 0;
    for (long i = 0; i < ITERS; i++) {
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            acc[c % 4] = _mm256_add_epi16(acc[c % 4], _mm256_maddubs_epi16(w[c % 4], bcast4(ybuf + at + 4 * c)));
        at = (at + 32) & (YBYTES - 1);
    }
    j->seconds = now() - t0;
    j->macs = (double)ITERS * 8 * 32;
    for (int c = 0; c < 4; c++)
        j->sink += fold(acc[c]);
}

/* G chunks summed in s16 before each madd: G = 8 is Q4_K (and Q4_0, Q4_1), G = 2 is Q6_K, whose
 * offset of 32 takes one more madd, a shift and a subtract a row */
static inline __attribute__((always_inline)) void loop_mix(Job *j, const int G, const int off, const int epilogue)
{
    __m256i w[8];
    for (int c = 0; c < 8; c++)
        w[c] = _mm256_loadu_si256((const __m256i *)wbuf + c);
    const __m256i sp = _mm256_set1_epi16(3), sc01 = _mm256_set1_epi32(0x00050007);
    const __m256 d = _mm256_set1_ps(0.01f);
    __m256i p[ROWS];
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) {
        p[r] = _mm256_setzero_si256();
        acc[r] = _mm256_setzero_ps();
    }
    double t0 = now();
    long at = 0;
    for (long i = 0; i < ITERS / ROWS; i++) {
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            const int8_t *y = ybuf + at + 32 * r;
            __m256i q = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int c0 = 0; c0 < 8; c0 += G) {
                __m256i s16 = _mm256_maddubs_epi16(w[c0], bcast4(y + 4 * c0));
#pragma GCC unroll 8
                for (int c = c0 + 1; c < c0 + G; c++)
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[c], bcast4(y + 4 * c)));
                q = _mm256_add_epi32(q, _mm256_madd_epi16(s16, sp));
            }
            if (off)
                q = _mm256_sub_epi32(q, _mm256_slli_epi32(_mm256_madd_epi16(sc01, bcast4(y)), 5));
            if (epilogue) { /* the block's float scale d * dy, as x8_kernels.h's block_x8 */
                q = _mm256_sub_epi32(q, _mm256_set1_epi32(8 * y[1]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(d, _mm256_broadcast_ss((const float *)y)), acc[r]);
            } else {
                p[r] = _mm256_add_epi32(p[r], q);
            }
        }
        at = (at + 32 * ROWS) & (YBYTES - 1);
    }
    j->seconds = now() - t0;
    j->macs = (double)(ITERS / ROWS) * ROWS * 256;
    for (int r = 0; r < ROWS; r++)
        j->sink += fold(p[r]) + fold(_mm256_cvtps_epi32(acc[r]));
}

static void *run(void *arg)
{
    Job *j = arg;
    if (!strcmp(j->loop, "maddubs"))
        loop_maddubs(j);
    else if (!strcmp(j->loop, "q4k"))
        loop_mix(j, 8, 0, 0);
    else if (!strcmp(j->loop, "q40"))
        loop_mix(j, 8, 0, 1);
    else
        loop_mix(j, 2, 1, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const int rounds = argc > 2 ? atoi(argv[2]) : 3;
    for (int i = 0; i < YBYTES + 64; i++)
        ybuf[i] = (int8_t)(i * 37 % 255 - 127);
    for (int i = 0; i < 8 * 32; i++)
        wbuf[i] = (uint8_t)(i * 11 % 16);
    const char *loops[] = {"maddubs", "q4k", "q40", "q6k"};
    for (int l = 0; l < 4; l++) {
        double best = 0;
        int32_t sink = 0;
        for (int round = 0; round < rounds; round++) {
            Job jobs[64] = {0};
            pthread_t tid[64];
            double t0 = now();
            for (int t = 0; t < threads; t++) {
                jobs[t].loop = loops[l];
                pthread_create(&tid[t], NULL, run, &jobs[t]);
            }
            double macs = 0;
            for (int t = 0; t < threads; t++) {
                pthread_join(tid[t], NULL);
                macs += jobs[t].macs;
                sink += jobs[t].sink;
            }
            const double gmacs = macs / (now() - t0) / 1e9;
            if (gmacs > best)
                best = gmacs;
        }
        printf("%s threads=%d gmac_s=%.1f (best of %d; sink %d)\n", loops[l], threads, best, rounds, sink & 1);
    }
    return 0;
}
