/* nf4lib native CPU kernels: the entry points of the products with the 4-bit weight, the
 * forward's GEMV / GEMM (y = x @ W.T) and the backward's GEMM (dL/dx = dL/dy @ W), split into
 * tasks over the weight's rows (forward) or columns (backward) on nf4cpu_api.c's threads. */
#include "nf4cpu.h"

#include <stdatomic.h>
#include <stdlib.h>

/* A GEMV task's weights: each thread then reads long runs of the packed weight, which the
 * prefetchers follow. bf16, batch 1, 2-core Xeon, medians of three runs: 28 Llama-shaped
 * layers read in turn 9.5 ms in tasks of 2^14 weights, 8.6 ms in tasks of 2^21; 11008x4096
 * 1.49 -> 1.35 ms (AVX2 kernels forced: 28 layers 13.6 -> 12.9 ms). At least 4 tasks per
 * thread keep the threads balanced when one of them is slowed by other work. */
#define GEMV_TASK_ELEMS (1 << 21)
/* Weights below this many elements take the GEMV on one thread (see nf4_gemv). */
#define GEMV_SERIAL (1 << 18)

typedef struct {
    const nf4_kernels *kn;
    const float *x;       /* float32 x, or NULL when xh is used */
    const uint16_t *xh;   /* bf16 x for kn->gemv_bf16 */
    int m;
    int64_t k, n, rows_per_task, bs;
    const uint8_t *packed;
    const nf4_scales *sc;
    const float *code16;
    int dtype;
    float *y;
    int gemm;           /* xh is for kn->gemm_bf16 (every row of x at once) */
    atomic_int failed;  /* a task's kernel ran out of memory */
} gemv_job;

static void gemv_task(void *p, int64_t t) {
    gemv_job *j = p;
    int64_t r0 = t * j->rows_per_task, r1 = r0 + j->rows_per_task < j->n ? r0 + j->rows_per_task : j->n;
    if (j->gemm) {  /* NF4_GEMM_MAX_ROWS rows of x at a time (each pass decodes the rows again) */
        for (int m0 = 0; m0 < j->m; m0 += NF4_GEMM_MAX_ROWS) {
            const int mm = j->m - m0 < NF4_GEMM_MAX_ROWS ? j->m - m0 : NF4_GEMM_MAX_ROWS;
            if (j->kn->gemm_bf16(j->xh + (int64_t)m0 * j->k, mm, j->k, j->packed, j->sc, j->code16, j->bs, r0, r1,
                                 j->y + (int64_t)m0 * j->n, j->n))
                atomic_store(&j->failed, 1);
        }
        return;
    }
    for (int m0 = 0; m0 < j->m; m0 += 8) {  /* at most 8 rows of x at a time */
        int mm = j->m - m0 < 8 ? j->m - m0 : 8;
        if (j->xh)
            j->kn->gemv_bf16(j->xh + (int64_t)m0 * j->k, mm, j->k, j->packed, j->sc, j->code16, j->bs,
                             r0, r1, j->y + (int64_t)m0 * j->n, j->n);
        else
            j->kn->gemv(j->x + (int64_t)m0 * j->k, mm, j->k, j->packed, j->sc, j->code16, j->bs, j->dtype,
                        r0, r1, j->y + (int64_t)m0 * j->n, j->n);
    }
}

/* y (m x n, float32) = x (m x k, float32 or bf16 as x_dtype says) @ W.T (+ bias), W (n x k)
 * the 4-bit weight, each weight rounded to `dtype` first (as dequantize(q).to(x.dtype)
 * would), products summed in float32. bf16 x with bf16 weights takes the instruction set's
 * bf16 dot-product kernel where it has one and the shape fits (k % 32 == 0, bs >= 32);
 * otherwise x is widened to float32 first (exactly). Returns 0, -1 if scratch memory ran
 * out, or NF4_EARGS if the buffers' lengths (in elements) do not cover the work. */
NF4_API int nf4_gemv(const void *x, int x_dtype, int64_t x_len, int64_t m, int64_t n, int64_t k, const uint8_t *packed,
                     int64_t packed_len, const nf4_scales *sc, const float *code16, int64_t bs, int dtype,
                     const float *bias, int64_t bias_len, float *y, int64_t y_len, int nthreads) {
    const nf4_kernels *kn = nf4_kernels_in_use();
    float *xp = NULL;
    uint16_t *xs = NULL;  /* bf16 x in the layout the kernel wants (nf4_split_x_bf16) */
    if (m < 0 || n < 0 || k < 0 || m > INT32_MAX || (n && k > ((int64_t)1 << 62) / n) || (m && k > ((int64_t)1 << 62) / m) ||
        (m && n > ((int64_t)1 << 62) / m))
        return NF4_EARGS;
    if (x_len < m * k || y_len < m * n || (bias && bias_len < n) || dtype < NF4_F32 || dtype > NF4_F16 ||
        (x_dtype != NF4_F32 && x_dtype != NF4_BF16) || !nf4_weight_ok(packed_len, sc, bs, n * k))
        return NF4_EARGS;
    if (m == 0 || n == 0) return 0;
    const float *xf = x;
    const uint16_t *xh = NULL;
    int gemm = 0;
    if (x_dtype == NF4_BF16) {
        if (kn->gemv_bf16 && dtype == NF4_BF16 && k % 32 == 0 && bs >= 32) {
            xh = x;
            xf = NULL;
            if (kn->gemm_bf16 && m >= NF4_GEMM_MIN_ROWS) {
                gemm = 1;
                xs = malloc(sizeof(uint16_t) * (size_t)kn->gemm_x_elems((int)m, k));
                if (!xs) return -1;
                kn->gemm_x(x, xs, (int)m, k, bs);
                xh = xs;
            } else if (kn->bf16_wants_split && kn->bf16_wants_split(k, bs)) {  /* the kernel table's own step */
                xs = malloc(sizeof(uint16_t) * (size_t)(m * k));
                if (!xs) return -1;
                kn->split_x_bf16(x, xs, (int)m, k);
                xh = xs;
            }
        } else {  /* bf16 -> float32 is exact: the float32 kernels give the same values */
            xp = malloc(sizeof(float) * (size_t)(m * k));
            if (!xp) return -1;
            for (int64_t i = 0; i < m * k; i++) xp[i] = nf4_load(x, NF4_BF16, i);
            xf = xp;
        }
    }
    if (!xh && kn->permute_x && kn->wants_permuted_x(k, bs)) {  /* the kernel table's own step */
        float *perm = malloc(sizeof(float) * (size_t)(m * k));
        if (!perm) { free(xp); return -1; }
        kn->permute_x(xf, perm, (int)m, k);
        free(xp);
        xp = perm;
        xf = xp;
    }
    /* tasks of about GEMV_TASK_ELEMS weights, at least 4 per thread */
    const int64_t per_thread = (n + 4 * (int64_t)(nthreads > 1 ? nthreads : 1) - 1) / (4 * (int64_t)(nthreads > 1 ? nthreads : 1));
    int64_t rows = GEMV_TASK_ELEMS / (k > 0 ? k : 1);
    rows = rows > per_thread ? per_thread : rows;
    rows = rows < 4 ? 4 : rows;
    if (gemm) rows = (rows + 31) / 32 * 32;  /* the GEMM's runs of 32 rows */
    gemv_job j = {kn, xf, xh, (int)m, k, n, rows, bs, packed, sc, code16, dtype, y, gemm, 0};
    /* waking a sleeping worker costs tens of microseconds: a weight of under GEMV_SERIAL
     * elements (a 512x512 layer) runs on the calling thread alone */
    nf4_parallel_for(gemv_task, &j, (n + rows - 1) / rows, n * k < GEMV_SERIAL ? 1 : nthreads);
    free(xp);
    free(xs);
    if (atomic_load(&j.failed)) return -1;
    if (bias)
        for (int64_t mm = 0; mm < m; mm++)
            for (int64_t r = 0; r < n; r++) y[mm * n + r] += bias[r];
    return 0;
}

typedef struct {
    const nf4_kernels *kn;
    const uint16_t *g;
    int m;
    int64_t n, k, bs;
    const uint8_t *packed;
    const nf4_scales *sc;
    const float *code16;
    float *y;
    atomic_int failed;
} gemm_t_job;

static void gemm_t_task(void *p, int64_t t) {
    gemm_t_job *j = p;
    const int64_t c0 = t * NF4_GEMM_T_COLS, nc = j->k - c0 < NF4_GEMM_T_COLS ? j->k - c0 : NF4_GEMM_T_COLS;
    if (j->kn->gemm_t_bf16(j->g, j->m, j->n, j->k, j->packed, j->sc, j->code16, j->bs, c0, nc, j->y))
        atomic_store(&j->failed, 1);
}

/* The backward's y (m x k, float32) = g (m x n, bf16) @ W (n x k), each weight bf16(code *
 * absmax) as dequantize gives it, products summed in float32: the instruction set's kernel
 * where it has one (AMX) and the shape fits (n % 32 == 0, k % 32 == 0, bs >= 32), else
 * NF4_EUNAVAILABLE (the caller decodes tiles instead). Returns 0, -1 if scratch memory ran
 * out, or NF4_EARGS if the buffers' lengths (in elements) do not cover the work. */
NF4_API int nf4_gemm_t(const uint16_t *g, int64_t g_len, int64_t m, int64_t n, int64_t k, const uint8_t *packed,
                       int64_t packed_len, const nf4_scales *sc, const float *code16, int64_t bs, float *y, int64_t y_len,
                       int nthreads) {
    const nf4_kernels *kn = nf4_kernels_in_use();
    if (m < 0 || n < 0 || k < 0 || m > INT32_MAX - 16 || (n && k > ((int64_t)1 << 62) / n) || (m && n > ((int64_t)1 << 62) / m) ||
        (m && k > ((int64_t)1 << 62) / m))
        return NF4_EARGS;
    if (g_len < m * n || y_len < m * k || !nf4_weight_ok(packed_len, sc, bs, n * k)) return NF4_EARGS;
    if (!kn->gemm_t_bf16 || n % 32 || k % 32 || bs < 32) return NF4_EUNAVAILABLE;
    if (m == 0 || k == 0) return 0;
    if (n == 0) {
        memset(y, 0, sizeof(float) * (size_t)(m * k));
        return 0;
    }
    uint16_t *gp = NULL;  /* the tiles read g 16 rows at a time: pad with zero rows */
    if (m % 16) {
        gp = calloc((size_t)((m + 15) / 16 * 16 * n), sizeof(uint16_t));
        if (!gp) return -1;
        memcpy(gp, g, sizeof(uint16_t) * (size_t)(m * n));
    }
    gemm_t_job j = {kn, gp ? gp : g, (int)m, n, k, bs, packed, sc, code16, y, 0};
    nf4_parallel_for(gemm_t_task, &j, (k + NF4_GEMM_T_COLS - 1) / NF4_GEMM_T_COLS, nthreads);
    free(gp);
    return atomic_load(&j.failed) ? -1 : 0;
}

