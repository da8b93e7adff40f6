/* A small persistent thread pool: ops_parallel_for(n, fn, ctx) runs fn(ctx, i) for
 * i = 0..n-1 on the calling thread and up to nth - 1 workers, which take indices from a
 * shared counter.
 *
 * Why not OpenMP: libgomp's default wait policy lets its workers fall asleep between the
 * ~10-100 us matmuls of a decode step and waking them cost more than the matmul; with
 * OMP_WAIT_POLICY=ACTIVE they spin forever; and a team waits for every member, so one
 * worker descheduled by another process (a shared 2-core machine) stalls the call for a
 * scheduler tick (4 ms measured). Here:
 *  - a worker spins for a bounded time (`spin_us`, default 2000) after its last task, then
 *    sleeps on a condition variable: a decode step keeps it hot, an idle server does not
 *    burn a core; ops_park() sends it to sleep at once, before an OpenBLAS GEMM that wants
 *    both cores;
 *  - a spinning worker takes a prefetch job when one is posted (ops_prefetch_async): after a
 *    matmul, the first bytes of the next one are read toward the caches while the caller runs
 *    the ops between them, and the read stops as soon as a task is published;
 *  - joining is optional: the caller takes indices too, and when none are left it closes
 *    the task and waits only for workers that joined before the close. A worker that wakes
 *    late finds the task closed and never touches it.
 *
 * State: `state` packs the task generation (high 32 bits), a closed bit and the number of
 * workers that joined. A worker joins with a CAS that succeeds only on the open task of the
 * generation it woke for; the caller closes with fetch_or, which returns the final count.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#include "ops_avx2.h"

#define MAX_THREADS 64
#define CLOSED (1ull << 31)
#define COUNT_MASK (CLOSED - 1)

static struct {
    pthread_mutex_t mu; /* with cv: sleeping workers */
    pthread_cond_t cv;
    int nworkers;
    atomic_ullong state;  /* gen << 32 | CLOSED | joined */
    atomic_int finished;  /* joined workers done with the current task */
    atomic_int sleepers;
    atomic_llong next;    /* next index to run */
    atomic_llong spin_ns;
    atomic_int park;      /* set: idle workers sleep now instead of spinning */
    int64_t n;
    unsigned max_join; /* workers allowed to join: nth - 1 */
    ops_task_fn fn;
    void *ctx;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, CLOSED, 0, 0, 0, 2000000, 0, 0, 0, 0, 0};

/* A prefetch job for an idle worker (ops_prefetch_async): the lines of up to 8 ranges. */
static pthread_mutex_t pf_mu = PTHREAD_MUTEX_INITIALIZER;
static const void *pf_ptr[8];
static int64_t pf_len[8];
static int pf_n;
static unsigned pf_gen;      /* the task generation current when it was posted */
static atomic_int pf_pending;

/* Serializes tasks (calls come without the GIL) and worker starts. */
static pthread_mutex_t task_mu = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void run_indices(void)
{
    for (;;) {
        const int64_t i = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed);
        if (i >= pool.n)
            return;
        pool.fn(pool.ctx, i);
    }
}

/* Bring [p, p + len) toward this core's caches, a page at a time, until done, a new task
 * (a generation other than `seen`) is published -- the matmul that reads these lines, or any
 * other pool task, has begun -- or the pool is parked for OpenBLAS. */
static void prefetch_lines(const void *start, int64_t len, unsigned seen)
{
    const char *p = start;
    for (int64_t off = 0; off < len; off += 4096) {
        if ((unsigned)(atomic_load_explicit(&pool.state, memory_order_relaxed) >> 32) != seen ||
            atomic_load_explicit(&pool.park, memory_order_relaxed))
            return;
        const int64_t end = off + 4096 < len ? off + 4096 : len;
        for (int64_t o = off; o < end; o += 64)
            _mm_prefetch(p + o, _MM_HINT_T1); /* L2: more than L1 holds is read */
    }
}

static void take_prefetch(unsigned seen)
{
    if (!atomic_load_explicit(&pf_pending, memory_order_relaxed) || pthread_mutex_trylock(&pf_mu) != 0)
        return;
    const void *p[8];
    int64_t len[8];
    const int n = pf_gen == seen ? pf_n : 0; /* posted before a task this worker has seen: stale */
    memcpy(p, pf_ptr, sizeof p);
    memcpy(len, pf_len, sizeof len);
    atomic_store(&pf_pending, 0);
    pthread_mutex_unlock(&pf_mu);
    for (int i = 0; i < n; i++)
        prefetch_lines(p[i], len[i], seen);
}

static void *worker(void *arg)
{
    unsigned seen = (unsigned)(uintptr_t)arg; /* the generation current when started */
    for (;;) {
        const int64_t deadline = now_ns() + atomic_load_explicit(&pool.spin_ns, memory_order_relaxed);
        unsigned long long st;
        for (int i = 0; (unsigned)((st = atomic_load(&pool.state)) >> 32) == seen; i++) {
            take_prefetch(seen);
            CPU_RELAX();
            if ((i & 255) == 255 && (now_ns() > deadline || atomic_load_explicit(&pool.park, memory_order_relaxed))) {
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((unsigned)((st = atomic_load(&pool.state)) >> 32) == seen)
                    pthread_cond_wait(&pool.cv, &pool.mu);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.mu);
                break;
            }
        }
        seen = (unsigned)(st >> 32);
        /* join the task of generation `seen` if it is still open */
        while (!(st & CLOSED) && (unsigned)(st >> 32) == seen && (st & COUNT_MASK) < pool.max_join) {
            if (atomic_compare_exchange_weak(&pool.state, &st, st + 1)) {
                run_indices();
                atomic_fetch_add(&pool.finished, 1);
                break;
            }
        }
    }
    return NULL;
}

/* After fork() the child has only the forking thread: forget the workers. */
static void reset_after_fork(void)
{
    pool.nworkers = 0;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&task_mu, NULL);
    pthread_mutex_init(&pf_mu, NULL); /* a worker may have held it at the fork */
    atomic_store(&pf_pending, 0);
}

/* Called with task_mu held. */
static void ensure_workers(int n)
{
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        atfork_done = 1;
    }
    while (pool.nworkers < n && pool.nworkers < MAX_THREADS - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const uintptr_t gen = (uintptr_t)(atomic_load(&pool.state) >> 32);
        const int rc = pthread_create(&t, &attr, worker, (void *)gen);
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break;
        pool.nworkers++;
    }
}

/* Before handing both cores to another thread pool (OpenBLAS): stop spinning now. */
void ops_park(void)
{
    atomic_store(&pool.park, 1);
}

void ops_set_spin_us(long us)
{
    atomic_store(&pool.spin_ns, (long long)us * 1000);
}

void ops_prefetch_async(int n, const void *const *p, const int64_t *len)
{
    if (n <= 0)
        return;
    pthread_mutex_lock(&pf_mu);
    pf_gen = (unsigned)(atomic_load(&pool.state) >> 32);
    pf_n = n < 8 ? n : 8;
    for (int i = 0; i < pf_n; i++)
        pf_ptr[i] = p[i], pf_len[i] = len[i];
    atomic_store(&pf_pending, 1);
    pthread_mutex_unlock(&pf_mu);
}

void ops_parallel_for(int64_t n, int nth, ops_task_fn fn, void *ctx)
{
    if (nth <= 1 || n <= 1) {
        for (int64_t i = 0; i < n; i++)
            fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&task_mu);
    ensure_workers(nth - 1);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.max_join = (unsigned)(nth - 1);
    atomic_store(&pool.next, 0);
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.park, 0);
    /* publish: a new generation, open, nobody joined (the seq_cst store orders the fields) */
    const unsigned long long gen = (atomic_load(&pool.state) >> 32) + 1;
    atomic_store(&pool.state, (gen & 0xFFFFFFFFull) << 32);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_indices();
    /* nothing left to take: close, then wait only for the workers that joined */
    const int joined = (int)(atomic_fetch_or(&pool.state, CLOSED) & COUNT_MASK);
    for (int i = 0; atomic_load(&pool.finished) < joined; i++) {
        if (i < 4096)
            CPU_RELAX();
        else
            sched_yield(); /* a joined worker was preempted: let it run */
    }
    pthread_mutex_unlock(&task_mu);
}

/* ---- per-thread scratch (the kernels' prepared weight groups) ---- */

typedef struct {
    void *p;
    size_t size;
} Scratch;

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v)
{
    Scratch *s = v;
    free(s->p);
    free(s);
}

static void scratch_key_make(void)
{
    pthread_key_create(&g_scratch_key, scratch_free);
}

void *ops_thread_scratch(size_t bytes)
{
    pthread_once(&g_scratch_once, scratch_key_make);
    Scratch *s = pthread_getspecific(g_scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(g_scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->size < bytes) {
        const size_t size = (bytes + 4095) & ~(size_t)4095;
        void *p = NULL;
        if (posix_memalign(&p, 64, size) != 0)
            return NULL;
        free(s->p);
        s->p = p;
        s->size = size;
    }
    return s->p;
}
