/* nf4lib native CPU kernels: quantize with error-minimising block scales (scale="mse").
 *
 * What nf4lib/_mse.py computes, block by block (see there for the algorithm and its
 * cost): with q(v, s) the nearest level to v * (1 / s) (clamped to [-1, 1], ties to the
 * lower level, exactly as quantize assigns codes) and c = level value,
 *
 *     E(s) = sum_j w_j (v_j - c_j s)^2
 *
 * is evaluated at s = absmax * ratio for each ratio of a grid (ratio 1 first), then
 * `steps` least-squares steps s' = sum w v c / sum w c^2 (each kept only if it lowers E).
 * Every term is a float32 product in the order written (built with -ffp-contract=off);
 * the sums are taken in double, so the pure-PyTorch path, which sums the same float32
 * terms in double in another order, picks the same scale unless two candidates' errors
 * agree to about 1e-16.
 */
#include "nf4cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

/* out = {E, sum w v c, sum w c c}; levels: the sorted level index of each element */
typedef void (*sse_fn)(const float *v, const float *w, int64_t n, float s, const float *thr15,
                       const float *lev16, double out[3], uint8_t *levels);

static void sse_scalar(const float *v, const float *w, int64_t n, float s, const float *thr15,
                       const float *lev16, double out[3], uint8_t *levels) {
    const float r = 1.0f / (s > 1e-38f ? s : 1e-38f);
    double e2 = 0.0, xc = 0.0, cc = 0.0;
    for (int64_t j = 0; j < n; j++) {
        float u = v[j] * r;
        u = u < -1.0f ? -1.0f : (u > 1.0f ? 1.0f : u);
        int l = nf4_level(u, thr15);
        levels[j] = (uint8_t)l;
        float c = lev16[l], wj = w ? w[j] : 1.0f;
        float e = v[j] - c * s;
        e2 += (double)((wj * e) * e);
        xc += (double)((wj * v[j]) * c);
        cc += (double)((wj * c) * c);
    }
    out[0] = e2; out[1] = xc; out[2] = cc;
}

#if NF4_X86
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma,f16c")))

static AVX2 double hsum(__m256d a, __m256d b) {
    __m256d s = _mm256_add_pd(a, b);
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

/* n a multiple of 8 */
static AVX2 void sse_avx2(const float *v, const float *w, int64_t n, float s, const float *thr15,
                          const float *lev16, double out[3], uint8_t *levels) {
    __m256 thr[15];
    for (int t = 0; t < 15; t++) thr[t] = _mm256_set1_ps(thr15[t]);
    const __m256 lev_lo = _mm256_loadu_ps(lev16), lev_hi = _mm256_loadu_ps(lev16 + 8);
    const __m256 r = _mm256_set1_ps(1.0f / (s > 1e-38f ? s : 1e-38f)), sv = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f), one = _mm256_set1_ps(1.0f);
    const __m256i seven = _mm256_set1_epi32(7);
    __m256d e0 = _mm256_setzero_pd(), e1 = e0, x0 = e0, x1 = e0, c0 = e0, c1 = e0;
    for (int64_t j = 0; j < n; j += 8) {
        __m256 vv = _mm256_loadu_ps(v + j);
        __m256 u = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(vv, r), lo), hi);
        /* #{t : thr[t] < u}, summed as a tree (the compares are independent: short chains) */
        __m256i m[15];
        for (int t = 0; t < 15; t++) m[t] = _mm256_castps_si256(_mm256_cmp_ps(u, thr[t], _CMP_GT_OQ));
        __m256i a0 = _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), _mm256_add_epi32(m[2], m[3]));
        __m256i a1 = _mm256_add_epi32(_mm256_add_epi32(m[4], m[5]), _mm256_add_epi32(m[6], m[7]));
        __m256i a2 = _mm256_add_epi32(_mm256_add_epi32(m[8], m[9]), _mm256_add_epi32(m[10], m[11]));
        __m256i a3 = _mm256_add_epi32(_mm256_add_epi32(m[12], m[13]), m[14]);
        __m256i l = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
        /* c = lev16[l]: two 8-entry permutes (low 3 bits), the upper half where l > 7 */
        __m256 c = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lev_lo, l), _mm256_permutevar8x32_ps(lev_hi, l),
                                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(l, seven)));
        /* 8 int32 levels -> 8 bytes */
        __m128i l16 = _mm_packs_epi32(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1));
        _mm_storel_epi64((__m128i *)(levels + j), _mm_packus_epi16(l16, l16));
        __m256 ww = w ? _mm256_loadu_ps(w + j) : one;
        __m256 e = _mm256_sub_ps(vv, _mm256_mul_ps(c, sv));
        __m256 te = _mm256_mul_ps(_mm256_mul_ps(ww, e), e);
        __m256 tx = _mm256_mul_ps(_mm256_mul_ps(ww, vv), c);
        __m256 tc = _mm256_mul_ps(_mm256_mul_ps(ww, c), c);
        e0 = _mm256_add_pd(e0, _mm256_cvtps_pd(_mm256_castps256_ps128(te)));
        e1 = _mm256_add_pd(e1, _mm256_cvtps_pd(_mm256_extractf128_ps(te, 1)));
        x0 = _mm256_add_pd(x0, _mm256_cvtps_pd(_mm256_castps256_ps128(tx)));
        x1 = _mm256_add_pd(x1, _mm256_cvtps_pd(_mm256_extractf128_ps(tx, 1)));
        c0 = _mm256_add_pd(c0, _mm256_cvtps_pd(_mm256_castps256_ps128(tc)));
        c1 = _mm256_add_pd(c1, _mm256_cvtps_pd(_mm256_extractf128_ps(tc, 1)));
    }
    out[0] = hsum(e0, e1); out[1] = hsum(x0, x1); out[2] = hsum(c0, c1);
}
#endif

typedef struct {
    const void *x;
    int dtype, nratios, steps, simd;
    int64_t n, bs, nblocks, blocks_per_task, wperiod;
    const float *w, *thr15, *lev16, *ratios;
    const uint8_t *storage16;
    uint8_t *packed;
    float *scales;
    atomic_int bad, oom;
} mse_job;

/* One block: the chosen scale, and its codes packed into `packed` (two per byte). */
static float mse_block(const mse_job *j, const float *v, const float *w, int64_t len, float am, uint8_t *lv, uint8_t *packed) {
#if NF4_X86
    sse_fn sse = j->simd && len % 8 == 0 ? sse_avx2 : sse_scalar;
#else
    sse_fn sse = sse_scalar;
#endif
    /* two level buffers: the best candidate's and the one being tried (swapped on a win) */
    uint8_t *best_lv = lv, *try_lv = lv + j->bs;
    double st[3], best[3];
    float best_s = am;
    sse(v, w, len, am, j->thr15, j->lev16, best, best_lv);
    for (int i = 0; i < j->nratios; i++) {
        float s = am * j->ratios[i];
        sse(v, w, len, s, j->thr15, j->lev16, st, try_lv);
        if (st[0] < best[0]) { uint8_t *t = best_lv; best_lv = try_lv; try_lv = t; best_s = s; memcpy(best, st, sizeof best); }
    }
    for (int t = 0; t < j->steps; t++) {
        if (!(best[2] > 0.0)) break;
        float s = (float)(best[1] / best[2]);  /* the least-squares scale of the current codes */
        if (!(s > 0.0f)) break;
        sse(v, w, len, s, j->thr15, j->lev16, st, try_lv);
        if (!(st[0] < best[0])) break;
        uint8_t *tmp = best_lv; best_lv = try_lv; try_lv = tmp;
        best_s = s;
        memcpy(best, st, sizeof best);
    }
    const uint8_t zero = j->storage16[nf4_level(0.0f, j->thr15)];  /* an odd tail pads with 0 */
    for (int64_t k = 0; k < len; k += 2) {
        uint8_t lo = k + 1 < len ? j->storage16[best_lv[k + 1]] : zero;
        packed[k / 2] = (uint8_t)((j->storage16[best_lv[k]] << 4) | lo);
    }
    return best_s;
}

static void mse_task(void *p, int64_t t) {
    mse_job *j = p;
    int64_t b0 = t * j->blocks_per_task, b1 = b0 + j->blocks_per_task < j->nblocks ? b0 + j->blocks_per_task : j->nblocks;
    float *v = malloc(sizeof(float) * (size_t)j->bs * 2);
    uint8_t *lv = malloc((size_t)j->bs * 2);
    if (!v || !lv) { free(v); free(lv); atomic_store(&j->oom, 1); return; }
    float *w = j->w ? v + j->bs : NULL;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t base = b * j->bs, len = base + j->bs <= j->n ? j->bs : j->n - base;
        int bad = 0;
        if (j->dtype == NF4_F32) memcpy(v, (const float *)j->x + base, sizeof(float) * (size_t)len);
        else for (int64_t k = 0; k < len; k++) v[k] = nf4_load(j->x, j->dtype, base + k);
        float am = 0.0f;
        for (int64_t k = 0; k < len; k++) {  /* NaN fails a <= max, so it is caught too */
            float a = fabsf(v[k]);
            bad |= !(a <= 3.40282347e+38f);
            am = a > am ? a : am;
        }
        if (w) {
            int64_t start = base % j->wperiod;
            if (start + len <= j->wperiod) memcpy(w, j->w + start, sizeof(float) * (size_t)len);
            else for (int64_t k = 0; k < len; k++) w[k] = j->w[(base + k) % j->wperiod];
        }
        if (bad) { atomic_store(&j->bad, 1); j->scales[b] = 0.0f; continue; }
        j->scales[b] = mse_block(j, v, w, len, am, lv, j->packed + base / 2);
    }
    free(v);
    free(lv);
}

void nf4_parallel_for(void (*fn)(void *, int64_t), void *ctx, int64_t ntasks, int nthreads);
int nf4_current_isa(void);

/* Quantize n values (float32/bf16/fp16) with searched block scales into packed
 * ((n + 1) / 2 bytes) and scales (ceil(n / bs) floats, stored where absmax goes).
 * w: NULL or float32 importance weights, element i's weight w[i % wperiod].
 * lev16: the sorted levels (16, padded), thr15 their midpoints, storage16 sorted index ->
 * stored code; ratios: nratios candidates (after ratio 1). Returns 1 for NaN/Inf in x,
 * -1 when scratch memory ran out, else 0. */
__attribute__((visibility("default"))) int nf4_quantize_mse(const void *x, int dtype, int64_t n, int64_t bs, const float *w, int64_t wperiod,
                     const float *thr15, const float *lev16, const uint8_t *storage16, const float *ratios,
                     int nratios, int steps, uint8_t *packed, float *scales, int nthreads) {
    mse_job j = {x, dtype, nratios, steps, nf4_current_isa() >= NF4_ISA_AVX2, n, bs, (n + bs - 1) / bs, 0, wperiod,
                 w, thr15, lev16, ratios, storage16, packed, scales, 0, 0};
    j.blocks_per_task = (1 << 14) / bs > 0 ? (1 << 14) / bs : 1;
    if (j.nblocks) nf4_parallel_for(mse_task, &j, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, nthreads);
    if (atomic_load(&j.oom)) return -1;
    return atomic_load(&j.bad) ? 1 : 0;
}
