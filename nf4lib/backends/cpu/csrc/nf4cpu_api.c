/* nf4lib native CPU kernels: the thread pool, the choice of kernel table by instruction
 * set, and the exported API (see nf4lib/backends/cpu/native.py, which loads this library
 * with ctypes) but for the products with the weight (nf4cpu_linear.c) and the MSE search
 * (nf4cpu_mse.c). The kernels themselves are in nf4cpu_scalar.c and the SIMD files.
 */
#define _GNU_SOURCE
#include "nf4cpu.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#if NF4_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif


/* ------------------------------------------------------------------ thread pool */
/* A persistent pool: the caller and up to nthreads - 1 workers take task indices from
 * one atomic counter. One job at a time; a caller that finds the pool busy (another
 * Python thread inside a kernel) runs its job alone. A forked child starts afresh. */

typedef void (*nf4_task)(void *ctx, int64_t task);

#define MAX_THREADS 256

static struct {
    pthread_mutex_t mu, busy;
    pthread_cond_t wake, done;
    int nworkers, nwant, finished;
    unsigned long gen;
    nf4_task fn;
    void *ctx;
    int64_t ntasks;
    atomic_llong next;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL, 0, 0};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* PyTorch's OpenMP entry point (see parallel_for), and whether this process is a fork */
typedef void (*gomp_parallel_fn)(void (*body)(void *), void *data, unsigned nthreads, unsigned flags);
static gomp_parallel_fn gomp_parallel = NULL;
static int forked = 0;

static void pool_child_reset(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.nworkers = 0;  /* the parent's workers do not exist in the child */
    forked = 1;         /* nor do OpenMP's */
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_child_reset); }

static void run_tasks(void) {
    int64_t t;
    while ((t = atomic_fetch_add(&pool.next, 1)) < pool.ntasks) pool.fn(pool.ctx, t);
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    /* Generations start at 1, so a worker started for the job in flight (created
     * before that job's gen++, running after it) takes part in it. */
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.gen;
        if (id >= pool.nwant) continue;
        pthread_mutex_unlock(&pool.mu);
        run_tasks();
        pthread_mutex_lock(&pool.mu);
        if (++pool.finished == pool.nwant) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* ------------------------------------------------------------------ PyTorch's OpenMP threads */
/* When PyTorch runs on GNU OpenMP, its worker threads spin for a while after each of its
 * parallel ops. Threads of our own would then share the cores with spinning ones: on a
 * 2-core machine a decode step's GEMVs ran at half speed (Llama-shaped model, 23 vs 35
 * tokens/s with OMP_WAIT_POLICY=PASSIVE). So, when native.py hands us libgomp's
 * GOMP_parallel (the entry point `#pragma omp parallel` compiles to, resolved in the
 * process PyTorch already loaded, never linked here), work runs on PyTorch's own threads.
 * A forked child goes back to the pool above: GNU OpenMP's threads do not survive a fork. */

typedef struct {
    nf4_task fn;
    void *ctx;
    int64_t ntasks;
    atomic_llong next;
} omp_job;

static void omp_body(void *p) {
    omp_job *j = p;
    int64_t t;
    while ((t = atomic_fetch_add(&j->next, 1)) < j->ntasks) j->fn(j->ctx, t);
}

static void parallel_for(nf4_task fn, void *ctx, int64_t ntasks, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > ntasks) nthreads = (int)ntasks;
    if (nthreads > 1 && gomp_parallel && !forked) {
        omp_job j = {fn, ctx, ntasks, 0};
        gomp_parallel(omp_body, &j, (unsigned)nthreads, 0);
        return;
    }
    if (nthreads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.mu);
    while (pool.nworkers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, worker, (void *)(intptr_t)pool.nworkers);
        pthread_attr_destroy(&attr);
        if (err) break;  /* fewer threads than asked: the results are the same */
        pool.nworkers++;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.ntasks = ntasks;
    atomic_store(&pool.next, 0);
    pool.nwant = nthreads - 1 < pool.nworkers ? nthreads - 1 : pool.nworkers;
    pool.finished = 0;
    pool.gen++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_tasks();
    pthread_mutex_lock(&pool.mu);
    while (pool.finished < pool.nwant) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.busy);
}

/* ------------------------------------------------------------------ dispatch */

#if NF4_X86
/* AMX tiles are usable once the OS saves their state (XCR0 bits 17, 18) and, on Linux,
 * once the process has asked for it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; granted
 * to the whole process, and asking again is harmless). Without the grant the first tile
 * instruction would kill the process. */
static int amx_permitted(uint64_t xcr0) {
    if ((xcr0 & (3u << 17)) != (3u << 17)) return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static int detect_isa(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return NF4_ISA_SCALAR;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx)) return NF4_ISA_SCALAR;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const uint64_t xcr0 = ((uint64_t)hi << 32) | lo;
    if ((xcr0 & 6) != 6) return NF4_ISA_SCALAR;  /* the OS saves no YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return NF4_ISA_SCALAR;
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    if (!(avx2 && fma && f16c)) return NF4_ISA_SCALAR;
    if (!(avx512f && (xcr0 & 0xE6) == 0xE6)) return NF4_ISA_AVX2;
    /* leaf 7, sub-leaf 0, EDX bits 22 and 24: AMX-BF16 and AMX-TILE */
    const int amx = ((d >> 22) & 1) && ((d >> 24) & 1);
    /* leaf 7, sub-leaf 1, EAX bit 5: AVX512_BF16 (vdpbf16ps) */
    if (!(avx512bw && avx512vl && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1))) return NF4_ISA_AVX512;
    return amx && amx_permitted(xcr0) ? NF4_ISA_AMX : NF4_ISA_AVX512BF16;
}
#else
static int detect_isa(void) { return NF4_ISA_SCALAR; }
#endif

static int best_isa = -1, cur_isa = -1;

static const nf4_kernels *kernels(void) {
    if (cur_isa < 0) cur_isa = best_isa = detect_isa();
#if NF4_X86
    if (cur_isa == NF4_ISA_AMX) return &nf4_amx_kernels;
    if (cur_isa == NF4_ISA_AVX512BF16) return &nf4_avx512bf16_kernels;
    if (cur_isa == NF4_ISA_AVX512) return &nf4_avx512_kernels;
    if (cur_isa == NF4_ISA_AVX2) return &nf4_avx2_kernels;
#endif
    return &nf4_scalar_kernels;
}

NF4_API int nf4_abi_version(void) { return NF4_ABI_VERSION; }

/* Run parallel work on the threads of this GOMP_parallel (libgomp's, which PyTorch loaded),
 * or on the library's own pool (NULL). Returns 1 if OpenMP's threads are in use. */
NF4_API int nf4_set_openmp(void *gomp_parallel_addr) {
    pthread_once(&atfork_once, register_atfork);
    gomp_parallel = (gomp_parallel_fn)gomp_parallel_addr;
    return gomp_parallel != NULL && !forked;
}

/* The best instruction set this CPU and build support. */
NF4_API int nf4_best_isa(void) { kernels(); return best_isa; }

/* Use `isa` (capped at the best supported) from now on; returns the one in force. */
NF4_API int nf4_set_isa(int isa) {
    kernels();
    cur_isa = isa < 0 ? 0 : (isa > best_isa ? best_isa : isa);
    return cur_isa;
}

NF4_API int nf4_get_isa(void) { kernels(); return cur_isa; }

/* for the other files' entry points (nf4cpu_linear.c, nf4cpu_mse.c; declared in nf4cpu.h) */
int nf4_current_isa(void) { kernels(); return cur_isa; }
const nf4_kernels *nf4_kernels_in_use(void) { return kernels(); }
void nf4_parallel_for(nf4_task fn, void *ctx, int64_t ntasks, int nthreads) { parallel_for(fn, ctx, ntasks, nthreads); }

/* ------------------------------------------------------------------ exported kernels */

/* Work is cut into tasks of about this many elements (whole 64-element chunks). */
#define TASK_ELEMS (1 << 16)

typedef struct {
    const nf4_kernels *kn;
    const uint8_t *packed;
    const nf4_scales *sc;
    const float *code16;
    int64_t bs, i0, i1, step;
    char *out;
    int dtype, esize;
} decode_job;

static void decode_task(void *p, int64_t t) {
    const decode_job *j = p;
    int64_t s = j->i0 + t * j->step, e = s + j->step < j->i1 ? s + j->step : j->i1;
    j->kn->decode(j->packed, j->sc, j->code16, j->bs, s, e, j->out + (s - j->i0) * j->esize, j->dtype);
}

/* Elements [i0, i1) of the weight, written to out[0 .. i1 - i0) as float32/bf16/fp16
 * (dtype | NF4_STREAM: with non-temporal stores where the instruction set has them).
 * Returns 0, or NF4_EARGS if the buffers' lengths do not cover the work. */
NF4_API int nf4_decode(const uint8_t *packed, int64_t packed_len, const nf4_scales *sc, const float *code16, int64_t bs,
                       int64_t i0, int64_t i1, void *out, int64_t out_len, int dtype, int nthreads) {
    const int plain = dtype & ~NF4_STREAM;
    if (i0 < 0 || i1 < i0 || out_len < i1 - i0 || plain < NF4_F32 || plain > NF4_F16 || !nf4_weight_ok(packed_len, sc, bs, i1))
        return NF4_EARGS;
    if (i1 == i0) return 0;
    decode_job j = {kernels(), packed, sc, code16, bs, i0, i1, TASK_ELEMS, out, dtype, plain == NF4_F32 ? 4 : 2};
    parallel_for(decode_task, &j, (i1 - i0 + TASK_ELEMS - 1) / TASK_ELEMS, nthreads);
    return 0;
}

typedef struct {
    const nf4_kernels *kn;
    const void *x;
    int dtype;
    int64_t nblocks, blocks_per_task, bs;
    const float *thr15;
    const uint8_t *storage16;
    uint8_t *packed;
    float *absmax;
    atomic_int bad;
} quant_job;

static void quant_task(void *p, int64_t t) {
    quant_job *j = p;
    int64_t b0 = t * j->blocks_per_task, b1 = b0 + j->blocks_per_task < j->nblocks ? b0 + j->blocks_per_task : j->nblocks;
    int bad = 0;
    j->kn->quantize(j->x, j->dtype, b0, b1, j->bs, j->thr15, j->storage16, j->packed, j->absmax, &bad);
    if (bad) atomic_store(&j->bad, 1);
}

/* Quantize n values (float32/bf16/fp16) into packed ((n + 1) / 2 bytes) and absmax
 * (ceil(n / bs) floats). thr15: the 15 sorted decision thresholds (+inf padded);
 * storage16: sorted level index -> stored code. Returns 1 if x holds NaN or Inf,
 * NF4_EARGS if the outputs' lengths do not fit n and bs. */
NF4_API int nf4_quantize(const void *x, int dtype, int64_t n, int64_t bs, const float *thr15, const uint8_t *storage16,
                         uint8_t *packed, int64_t packed_len, float *absmax, int64_t absmax_len, int nthreads) {
    if (!nf4_blocksize_ok(bs) || n < 0 || n > ((int64_t)1 << 62) || packed_len < (n + 1) / 2 ||
        absmax_len < (n + bs - 1) / bs || dtype < NF4_F32 || dtype > NF4_F16)
        return NF4_EARGS;
    quant_job j = {kernels(), x, dtype, n / bs, 0, bs, thr15, storage16, packed, absmax, 0};
    j.blocks_per_task = TASK_ELEMS / bs > 0 ? TASK_ELEMS / bs : 1;
    if (j.nblocks) parallel_for(quant_task, &j, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, nthreads);
    int bad = atomic_load(&j.bad);
    if (n % bs) nf4_quantize_tail(x, dtype, j.nblocks * bs, n, thr15, storage16, packed, absmax + j.nblocks, &bad);
    return bad;
}
