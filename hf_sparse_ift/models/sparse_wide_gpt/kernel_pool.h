/* The work-sharing pool of the native CPU kernels (condensed_kernel.c, block_sparse_kernel.c), included by each: the
   calling thread works through chunks of a job and helper threads (woken for it) take chunks too; the caller waits
   only for chunks a helper has started. On a machine shared with other processes a helper the OS has not scheduled
   yet simply takes no chunk, where an OpenMP region would wait for it at its join. The helpers are this library's own
   pthreads: no torch or OpenMP thread setting is read or changed. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

typedef void (*chunk_fn)(const void* ctx, int64_t begin, int64_t end);
typedef struct {
    chunk_fn fn;
    const void* ctx;
    int64_t total, chunk;
    atomic_llong next, done;
    atomic_int refs;
} job_t;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static job_t* pool_job = NULL;
static uint64_t pool_gen = 0;
static int pool_helpers = 0;

static void job_release(job_t* j) { if (atomic_fetch_sub(&j->refs, 1) == 1) free(j); }

static void job_work(job_t* j) {
    for (;;) {
        const int64_t b = atomic_fetch_add(&j->next, j->chunk);
        if (b >= j->total) return;
        const int64_t e = b + j->chunk < j->total ? b + j->chunk : j->total;
        j->fn(j->ctx, b, e);
        atomic_fetch_add(&j->done, e - b);
    }
}

static void* helper_main(void* unused) {
    (void)unused;
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool_mu);
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        job_t* j = pool_job;
        if (j) atomic_fetch_add(&j->refs, 1);
        pthread_mutex_unlock(&pool_mu);
        if (j) {
            job_work(j);
            job_release(j);
        }
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* helpers do not survive fork */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pool_job = NULL;
    pool_helpers = 0;
}

void pool_init(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }  /* called once, from Python */

static void parallel_run(chunk_fn fn, const void* ctx, int64_t total, int64_t chunk, int threads) {
    if (threads <= 1 || total <= chunk) {
        fn(ctx, 0, total);
        return;
    }
    job_t* j = (job_t*)malloc(sizeof(job_t));
    if (!j) {
        fn(ctx, 0, total);
        return;
    }
    j->fn = fn;
    j->ctx = ctx;
    j->total = total;
    j->chunk = chunk;
    atomic_init(&j->next, 0);
    atomic_init(&j->done, 0);
    atomic_init(&j->refs, 1);
    pthread_mutex_lock(&pool_mu);
    while (pool_helpers < threads - 1 && pool_helpers < 255) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool_helpers++;
    }
    pool_job = j;
    pool_gen++;
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    job_work(j);
    while (atomic_load(&j->done) < total) sched_yield();
    pthread_mutex_lock(&pool_mu);
    if (pool_job == j) pool_job = NULL;
    pthread_mutex_unlock(&pool_mu);
    job_release(j);
}

