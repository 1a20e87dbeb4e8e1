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
 * Every term is a float32 product in the order written (built with -ffp-contract=off),
 * summed in 8 float32 lanes then in double (see lane_totals): the pure-PyTorch path and
 * the numpy reference sum the same way, so all three pick the same scales, bit for bit.
 */
#include "nf4cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

/* sse_*: out = {E, sum w v c, sum w c c}; levels: the sorted level index of each element */

/* The three sums are taken in 8 float32 lanes (element j in lane j % 8, added in order),
 * then the lane totals are added in double, lane 0 first: the scalar and AVX2 kernels (and
 * nf4lib/_mse.py) so get the same bits. */
static void lane_totals(const float acc[3][8], double out[3]) {
    for (int k = 0; k < 3; k++) {
        double t = 0.0;
        for (int lane = 0; lane < 8; lane++) t += (double)acc[k][lane];
        out[k] = t;
    }
}

static void sse_scalar(const float *v, const float *w, int64_t n, float s, const float *thr15,
                       const float *lev16, double out[3], uint8_t *levels) {
    const float r = 1.0f / (s > 1e-38f ? s : 1e-38f);
    float acc[3][8] = {{0}};
    for (int64_t j = 0; j < n; j++) {
        float u = v[j] * r;
        u = u < -1.0f ? -1.0f : (u > 1.0f ? 1.0f : u);
        int l = nf4_level(u, thr15);
        levels[j] = (uint8_t)l;
        float c = lev16[l], wj = w ? w[j] : 1.0f;
        float e = v[j] - c * s;
        acc[0][j & 7] += (wj * e) * e;
        acc[1][j & 7] += (wj * v[j]) * c;
        acc[2][j & 7] += (wj * c) * c;
    }
    lane_totals(acc, out);
}

#if NF4_X86
#include "nf4cpu_avx2.h"


/* t[idx] for a 16-entry table held as two vectors (lanes' idx in [0, 15]) */
AVX2_INLINE __m256 perm16(__m256 lo, __m256 hi, __m256i idx) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
}

/* the tables sse_avx2 reads, built once per task */
typedef struct { __m256 thr_lo, thr_hi, t7, lev_lo, lev_hi; } avx2_tables;

static AVX2 void avx2_tables_init(avx2_tables *t, const float *thr15, const float *lev16) {
    float thr16[16];
    memcpy(thr16, thr15, sizeof(float) * 15);
    thr16[15] = __builtin_inff();
    t->thr_lo = _mm256_loadu_ps(thr16);
    t->thr_hi = _mm256_loadu_ps(thr16 + 8);
    t->t7 = _mm256_set1_ps(thr16[7]);
    t->lev_lo = _mm256_loadu_ps(lev16);
    t->lev_hi = _mm256_loadu_ps(lev16 + 8);
}

/* n a multiple of 8 */
static AVX2 void sse_avx2(const float *v, const float *w, int64_t n, float s, const avx2_tables *tb,
                          double out[3], uint8_t *levels) {
    const __m256 thr_lo = tb->thr_lo, thr_hi = tb->thr_hi, t7 = tb->t7, lev_lo = tb->lev_lo, lev_hi = tb->lev_hi;
    const __m256i one_i = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), three = _mm256_set1_epi32(3);
    const __m256i four = _mm256_set1_epi32(4), eight = _mm256_set1_epi32(8);
    const __m256 r = _mm256_set1_ps(1.0f / (s > 1e-38f ? s : 1e-38f)), sv = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f), one = _mm256_set1_ps(1.0f);
    __m256 ae = _mm256_setzero_ps(), ax = ae, ac = ae;
    for (int64_t j = 0; j < n; j += 8) {
        __m256 vv = _mm256_loadu_ps(v + j);
        __m256 u = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(vv, r), lo), hi);
        /* #{t : thr[t] < u} by binary search over the 16 (+inf padded) sorted thresholds:
         * four compares instead of fifteen */
        __m256i l = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(u, t7, _CMP_GT_OQ)), eight);
        l = _mm256_add_epi32(l, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(u, perm16(thr_lo, thr_hi, _mm256_add_epi32(l, three)), _CMP_GT_OQ)), four));
        l = _mm256_add_epi32(l, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(u, perm16(thr_lo, thr_hi, _mm256_add_epi32(l, one_i)), _CMP_GT_OQ)), two));
        l = _mm256_add_epi32(l, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(u, perm16(thr_lo, thr_hi, l), _CMP_GT_OQ)), one_i));
        /* c = lev16[l]: two 8-entry permutes (low 3 bits), the upper half where l > 7 */
        __m256 c = perm16(lev_lo, lev_hi, l);
        /* 8 int32 levels -> 8 bytes */
        __m128i l16 = _mm_packs_epi32(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1));
        _mm_storel_epi64((__m128i *)(levels + j), _mm_packus_epi16(l16, l16));
        __m256 ww = w ? _mm256_loadu_ps(w + j) : one;
        __m256 e = _mm256_sub_ps(vv, _mm256_mul_ps(c, sv));
        __m256 te = _mm256_mul_ps(_mm256_mul_ps(ww, e), e);
        __m256 tx = _mm256_mul_ps(_mm256_mul_ps(ww, vv), c);
        __m256 tc = _mm256_mul_ps(_mm256_mul_ps(ww, c), c);
        ae = _mm256_add_ps(ae, te);
        ax = _mm256_add_ps(ax, tx);
        ac = _mm256_add_ps(ac, tc);
    }
    float acc[3][8];
    _mm256_storeu_ps(acc[0], ae);
    _mm256_storeu_ps(acc[1], ax);
    _mm256_storeu_ps(acc[2], ac);
    lane_totals(acc, out);
}
/* max |v| of n values (n a multiple of 8); sets *bad on NaN or Inf */
static AVX2 float absmax_avx2(const float *v, int64_t n, int *bad) {
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(3.40282347e+38f);
    __m256 m = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t j = 0; j < n; j += 8) {
        __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j));
        finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, fmax, _CMP_LE_OQ));
        m = _mm256_max_ps(m, a);
    }
    if (_mm256_movemask_ps(finite) != 0xFF) *bad = 1;
    return nf4_hmax8(m);
}

/* 16 sorted level indices at a time -> stored codes, two per byte (n a multiple of 16) */
static AVX2 void pack_avx2(const uint8_t *lv, int64_t n, const uint8_t *storage16, uint8_t *packed) {
    const __m128i storage = _mm_loadu_si128((const __m128i *)storage16);
    for (int64_t k = 0; k < n; k += 16) nf4_pack16(_mm_loadu_si128((const __m128i *)(lv + k)), storage, packed + k / 2);
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
static float mse_block(const mse_job *j, const void *tables, const float *v, const float *w, int64_t len, float am,
                       uint8_t *lv, uint8_t *packed) {
#if NF4_X86
    const int simd = tables != NULL && len % 8 == 0;
#define SSE(s_, out_, lv_) (simd ? sse_avx2(v, w, len, (s_), tables, (out_), (lv_)) \
                             : sse_scalar(v, w, len, (s_), j->thr15, j->lev16, (out_), (lv_)))
#else
    (void)tables;
#define SSE(s_, out_, lv_) sse_scalar(v, w, len, (s_), j->thr15, j->lev16, (out_), (lv_))
#endif
    /* two level buffers: the best candidate's and the one being tried (swapped on a win) */
    uint8_t *best_lv = lv, *try_lv = lv + j->bs;
    double st[3], best[3];
    float best_s = am;
    SSE(am, best, best_lv);
    for (int i = 0; i < j->nratios; i++) {
        float s = am * j->ratios[i];
        SSE(s, st, try_lv);
        if (st[0] < best[0]) { uint8_t *t = best_lv; best_lv = try_lv; try_lv = t; best_s = s; memcpy(best, st, sizeof best); }
    }
    for (int t = 0; t < j->steps; t++) {
        if (!(best[2] > 0.0)) break;
        float s = (float)(best[1] / best[2]);  /* the least-squares scale of the current codes */
        if (!(s > 0.0f)) break;
        SSE(s, st, try_lv);
        if (!(st[0] < best[0])) break;
        uint8_t *tmp = best_lv; best_lv = try_lv; try_lv = tmp;
        best_s = s;
        memcpy(best, st, sizeof best);
    }
#if NF4_X86
#undef SSE
    if (simd && len % 16 == 0) {
        pack_avx2(best_lv, len, j->storage16, packed);
        return best_s;
    }
#endif
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
    const void *tables = NULL;
#if NF4_X86
    avx2_tables tb;
    if (j->simd) { avx2_tables_init(&tb, j->thr15, j->lev16); tables = &tb; }
#endif
    for (int64_t b = b0; b < b1; b++) {
        const int64_t base = b * j->bs, len = base + j->bs <= j->n ? j->bs : j->n - base;
        int bad = 0;
        const float *vb = v;
        if (j->dtype == NF4_F32) vb = (const float *)j->x + base;  /* read in place: no copy */
        else for (int64_t k = 0; k < len; k++) v[k] = nf4_load(j->x, j->dtype, base + k);
        float am = 0.0f;
#if NF4_X86
        if (j->simd && len % 8 == 0) am = absmax_avx2(vb, len, &bad);
        else
#endif
        for (int64_t k = 0; k < len; k++) {  /* NaN fails a <= max, so it is caught too */
            float a = fabsf(vb[k]);
            bad |= !(a <= 3.40282347e+38f);
            am = a > am ? a : am;
        }
        if (w) {
            int64_t start = base % j->wperiod;
            if (start + len <= j->wperiod) memcpy(w, j->w + start, sizeof(float) * (size_t)len);
            else for (int64_t k = 0; k < len; k++) w[k] = j->w[(base + k) % j->wperiod];
        }
        if (bad) { atomic_store(&j->bad, 1); j->scales[b] = 0.0f; continue; }
        j->scales[b] = mse_block(j, tables, vb, w, len, am, lv, j->packed + base / 2);
    }
    free(v);
    free(lv);
}

/* Quantize n values (float32/bf16/fp16) with searched block scales into packed
 * ((n + 1) / 2 bytes) and scales (ceil(n / bs) floats, stored where absmax goes).
 * w: NULL or float32 importance weights, element i's weight w[i % wperiod].
 * lev16: the sorted levels (16, padded), thr15 their midpoints, storage16 sorted index ->
 * stored code; ratios: nratios candidates (after ratio 1). Returns 1 for NaN/Inf in x,
 * -1 when scratch memory ran out, NF4_EARGS when the outputs' lengths do not fit
 * n and bs, else 0. */
NF4_API int nf4_quantize_mse(const void *x, int dtype, int64_t n, int64_t bs, const float *w, int64_t wperiod,
                     const float *thr15, const float *lev16, const uint8_t *storage16, const float *ratios,
                     int nratios, int steps, uint8_t *packed, int64_t packed_len, float *scales, int64_t scales_len,
                     int nthreads) {
    if (!nf4_blocksize_ok(bs) || n < 0 || n > ((int64_t)1 << 62) || packed_len < (n + 1) / 2 ||
        scales_len < (n + bs - 1) / bs || (w && wperiod <= 0) || nratios < 0 || dtype < NF4_F32 || dtype > NF4_F16)
        return NF4_EARGS;
    mse_job j = {x, dtype, nratios, steps, nf4_current_isa() >= NF4_ISA_AVX2, n, bs, (n + bs - 1) / bs, 0, wperiod,
                 w, thr15, lev16, ratios, storage16, packed, scales, 0, 0};
    j.blocks_per_task = (1 << 14) / bs > 0 ? (1 << 14) / bs : 1;
    if (j.nblocks) nf4_parallel_for(mse_task, &j, (j.nblocks + j.blocks_per_task - 1) / j.blocks_per_task, nthreads);
    if (atomic_load(&j.oom)) return -1;
    return atomic_load(&j.bad) ? 1 : 0;
}
