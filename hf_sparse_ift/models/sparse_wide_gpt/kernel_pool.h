/* The work sharing of the native CPU kernels (condensed_kernel.c, block_sparse_kernel.c), included by each. A job is
   a range of items taken in chunks, through an atomic counter, by every thread that works on it, so faster threads
   take more chunks. Two ways to supply the threads:

   - torch's OpenMP runtime (default where the Python side finds it, `pool_use_openmp`): each job is one parallel
     region of that runtime, through its GOMP_parallel, so the kernels run on the threads torch's own ops run on,
     already awake after them. With a pool of its own, torch's OpenMP threads (spinning after each op by default)
     and the pool's threads took turns on the same cores: on 2 idle cores the products of a d_model-512 SW-75 layer
     at 1024 tokens took 1.1-1.5x as long, a whole SW-75 training step 1.04x (benchmarks/block_sparse.py, variant
     native-own-threads, Intel Xeon, 2026-12-03).
   - this library's own pthreads (`HF_SPARSE_IFT_KERNEL_THREADS=own`, or no OpenMP runtime found): the calling thread
     works through the chunks and helpers, woken for the job, take chunks too; the caller waits only for chunks a
     helper has started, so on a machine loaded by other processes a helper the OS has not scheduled yet takes no
     chunk, where an OpenMP region waits for every thread at its join.

   Neither reads or changes a torch or OpenMP thread setting: the thread count is the caller's. */
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

/* libgomp's entry point of a parallel region (LLVM's and Intel's OpenMP runtimes export it too) */
typedef void (*gomp_parallel_t)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
static gomp_parallel_t pool_openmp = NULL;

/* Run jobs on the threads of the OpenMP runtime whose GOMP_parallel this is (NULL: this library's own threads);
   called from Python when the library is opened. */
void pool_use_openmp(void* gomp_parallel) { pool_openmp = (gomp_parallel_t)gomp_parallel; }

static void openmp_member(void* job) { job_work((job_t*)job); }

static void job_init(job_t* j, chunk_fn fn, const void* ctx, int64_t total, int64_t chunk) {
    j->fn = fn;
    j->ctx = ctx;
    j->total = total;
    j->chunk = chunk;
    atomic_init(&j->next, 0);
    atomic_init(&j->done, 0);
    atomic_init(&j->refs, 1);
}

static void parallel_run(chunk_fn fn, const void* ctx, int64_t total, int64_t chunk, int threads) {
    if (threads <= 1 || total <= chunk) {
        fn(ctx, 0, total);
        return;
    }
    if (pool_openmp) {
        job_t job;
        job_init(&job, fn, ctx, total, chunk);
        pool_openmp(openmp_member, &job, (unsigned)threads, 0);
        return;
    }
    job_t* j = (job_t*)malloc(sizeof(job_t));
    if (!j) {
        fn(ctx, 0, total);
        return;
    }
    job_init(j, fn, ctx, total, chunk);
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

