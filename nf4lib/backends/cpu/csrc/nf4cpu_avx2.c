/* nf4lib native CPU kernels: AVX2 (+FMA, F16C).
 *
 * Decoding by byte-table lookup. For each block, the 16 possible weights
 *     t[j] = round_to_dtype(code[j] * absmax)        (float32 products, as the scalar path)
 * are split into four 16-byte planes (byte 0, 1, 2, 3 of each float32), and
 * `vpshufb` looks up 32 codes per plane per instruction. A 64-element chunk (32 packed
 * bytes) decodes with 4-8 lookups and byte/word interleaves; for bfloat16 only planes 2
 * and 3 are needed (a bfloat16 is the top half of its float32).
 *
 * The interleaves leave a chunk's float32 weights in this lane order (two 128-bit lanes
 * per register; I0 holds codes 0-15 | 32-47, I1 codes 16-31 | 48-63):
 *     F0 = [0-3 | 32-35]  F1 = [4-7 | 36-39]  F2 = [8-11 | 40-43]  F3 = [12-15 | 44-47]
 *     G0..G3 = the same + 16
 * Dequantize puts them back in order with lane permutes; the GEMV instead permutes x
 * once into the same order (permute_x, the kernel table's step) and multiplies as they come.
 *
 * The fast path needs 64-element chunks inside one block per 128-bit lane (blocksize
 * >= 32); heads, tails and blocksize 16 go through the scalar kernels.
 */
#include "nf4cpu.h"

#if NF4_X86
#include "nf4cpu_avx2.h"

/* the four byte planes of 16 float32 values (v0: values 0-7, v1: 8-15) */
AVX2_INLINE void planes_of(__m256 v0, __m256 v1, __m128i p[4]) {
    /* per lane, a 4x4 byte transpose: dword k = byte k of the lane's 4 floats */
    const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i y0 = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(v0), tr), order);
    __m256i y1 = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_castps_si256(v1), tr), order);
    __m256i p02 = _mm256_unpacklo_epi64(y0, y1), p13 = _mm256_unpackhi_epi64(y0, y1);
    p[0] = _mm256_castsi256_si128(p02);
    p[1] = _mm256_castsi256_si128(p13);
    p[2] = _mm256_extracti128_si256(p02, 1);
    p[3] = _mm256_extracti128_si256(p13, 1);
}

AVX2_INLINE __m256 round_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);  /* NaN -> 0x7FC0, as c10::BFloat16 */
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
}

AVX2_INLINE __m256 round_f16(__m256 v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }

/* the planes of one block's table: t[j] = round(code[j] * a) */
AVX2_INLINE void block_planes(const float *code16, float a, int dtype, __m128i p[4]) {
    __m256 s = _mm256_set1_ps(a);
    __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(code16), s), v1 = _mm256_mul_ps(_mm256_loadu_ps(code16 + 8), s);
    if (dtype == NF4_BF16) { v0 = round_bf16(v0); v1 = round_bf16(v1); }
    else if (dtype == NF4_F16) { v0 = round_f16(v0); v1 = round_f16(v1); }
    planes_of(v0, v1, p);
}

/* Tables for the chunk starting at element i (64-aligned): lane 0 serves elements
 * i..i+31, lane 1 elements i+32..i+63; with blocksize >= 64 both are one block,
 * cached across chunks. */
typedef struct { int64_t block; __m256i t[4]; } tables;

AVX2_INLINE void chunk_tables(tables *tb, const nf4_scales *sc, const float *code16, int64_t bs, int dtype, int64_t i) {
    __m128i a[4], b[4];
    if (bs >= 64) {
        int64_t blk = i >> nf4_log2(bs);
        if (blk == tb->block) return;
        tb->block = blk;
        block_planes(code16, nf4_block_scale(sc, blk), dtype, a);
        for (int k = 0; k < 4; k++) tb->t[k] = _mm256_broadcastsi128_si256(a[k]);
    } else {  /* blocksize 32: each lane its own block */
        block_planes(code16, nf4_block_scale(sc, (i >> 5)), dtype, a);
        block_planes(code16, nf4_block_scale(sc, (i >> 5) + 1), dtype, b);
        for (int k = 0; k < 4; k++) tb->t[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(a[k]), b[k], 1);
    }
}

/* GEMV, bfloat16 weights: only planes 2 and 3 (the bfloat16 bits), built without the
 * full transpose: round, keep the top halves, gather low / high bytes. No NaN
 * special case: a NaN weight stays a NaN (or Inf) and the dot product is NaN anyway. */
AVX2_INLINE __m256i bf16_halves(const float *code16, float a) {
    __m256 s = _mm256_set1_ps(a);
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    __m256i u0 = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(code16), s));
    __m256i u1 = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(code16 + 8), s));
    u0 = _mm256_srli_epi32(_mm256_add_epi32(u0, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u0, 16), one))), 16);
    u1 = _mm256_srli_epi32(_mm256_add_epi32(u1, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u1, 16), one))), 16);
    /* words: lane 0 = v0-3, v8-11; lane 1 = v4-7, v12-15. Per lane: low bytes, then high bytes */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    return _mm256_shuffle_epi8(_mm256_packus_epi32(u0, u1), split);
}

AVX2_INLINE void chunk_tables_bf16(tables *tb, const nf4_scales *sc, const float *code16, int64_t bs, int64_t i) {
    const __m256i lo = _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5), hi = _mm256_setr_epi32(2, 6, 3, 7, 2, 6, 3, 7);
    if (bs >= 64) {
        int64_t blk = i >> nf4_log2(bs);
        if (blk == tb->block) return;
        tb->block = blk;
        __m256i h = bf16_halves(code16, nf4_block_scale(sc, blk));
        tb->t[2] = _mm256_permutevar8x32_epi32(h, lo);  /* low bytes of t[0..15], both lanes */
        tb->t[3] = _mm256_permutevar8x32_epi32(h, hi);
    } else {
        __m256i a = bf16_halves(code16, nf4_block_scale(sc, i >> 5)), b = bf16_halves(code16, nf4_block_scale(sc, (i >> 5) + 1));
        tb->t[2] = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(a, lo), _mm256_permutevar8x32_epi32(b, lo), 0x20);
        tb->t[3] = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(a, hi), _mm256_permutevar8x32_epi32(b, hi), 0x20);
    }
}

/* Code indices of the 64 elements in 32 packed bytes, in element order per lane. */
AVX2_INLINE void chunk_indices(const uint8_t *p, __m256i *i0, __m256i *i1) {
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256i b = _mm256_loadu_si256((const __m256i *)p);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);  /* even elements */
    __m256i lo = _mm256_and_si256(b, low4);                          /* odd elements */
    *i0 = _mm256_unpacklo_epi8(hi, lo);
    *i1 = _mm256_unpackhi_epi8(hi, lo);
}

/* 16 float32 weights (4 registers, lane order above) for the 32 indices in `idx` */
AVX2_INLINE void lookup_f32(const tables *tb, __m256i idx, __m256 f[4]) {
    __m256i b0 = _mm256_shuffle_epi8(tb->t[0], idx), b1 = _mm256_shuffle_epi8(tb->t[1], idx);
    __m256i b2 = _mm256_shuffle_epi8(tb->t[2], idx), b3 = _mm256_shuffle_epi8(tb->t[3], idx);
    __m256i l01 = _mm256_unpacklo_epi8(b0, b1), l23 = _mm256_unpacklo_epi8(b2, b3);
    __m256i h01 = _mm256_unpackhi_epi8(b0, b1), h23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

/* bfloat16 weights as 16-bit values: R0 = [0-7 | 32-39], R1 = [8-15 | 40-47] (for I0) */
AVX2_INLINE void lookup_bf16(const tables *tb, __m256i idx, __m256i *r0, __m256i *r1) {
    __m256i b2 = _mm256_shuffle_epi8(tb->t[2], idx), b3 = _mm256_shuffle_epi8(tb->t[3], idx);
    *r0 = _mm256_unpacklo_epi8(b2, b3);
    *r1 = _mm256_unpackhi_epi8(b2, b3);
}

static AVX2 void decode_avx2(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                             int64_t i0, int64_t i1, void *out, int dtype) {
    if (bs < 32) { nf4_decode_scalar(packed, sc, code16, bs, i0, i1, out, dtype); return; }
    /* NF4_STREAM: non-temporal stores for outputs far larger than the caches (2.2x the
     * write bandwidth of plain stores measured here), when the output is 32-byte aligned */
    const int want_stream = dtype & NF4_STREAM;
    dtype &= ~NF4_STREAM;
    const int esize = dtype == NF4_F32 ? 4 : 2;
    const int stream = want_stream && ((uintptr_t)out + ((-i0) & 63) * esize) % 32 == 0;
    int64_t i = (i0 + 63) & ~(int64_t)63;
    if (i > i1) i = i1;
    nf4_decode_scalar(packed, sc, code16, bs, i0, i, out, dtype);
    tables tb = {.block = -1};
    for (; i + 64 <= i1; i += 64) {
        char *o = (char *)out + (i - i0) * esize;
        __m256i x0, x1;
        chunk_tables(&tb, sc, code16, bs, dtype, i);
        chunk_indices(packed + i / 2, &x0, &x1);
        if (dtype == NF4_BF16) {
            __m256i r0, r1, r2, r3;
            lookup_bf16(&tb, x0, &r0, &r1);
            lookup_bf16(&tb, x1, &r2, &r3);
            __m256i *d = (__m256i *)o, v[4];
            v[0] = _mm256_permute2x128_si256(r0, r1, 0x20);
            v[1] = _mm256_permute2x128_si256(r2, r3, 0x20);
            v[2] = _mm256_permute2x128_si256(r0, r1, 0x31);
            v[3] = _mm256_permute2x128_si256(r2, r3, 0x31);
            if (stream) for (int k = 0; k < 4; k++) _mm256_stream_si256(d + k, v[k]);
            else for (int k = 0; k < 4; k++) _mm256_storeu_si256(d + k, v[k]);
        } else {
            __m256 f[4], g[4], v[8];
            lookup_f32(&tb, x0, f);
            lookup_f32(&tb, x1, g);
            v[0] = _mm256_permute2f128_ps(f[0], f[1], 0x20);
            v[1] = _mm256_permute2f128_ps(f[2], f[3], 0x20);
            v[2] = _mm256_permute2f128_ps(g[0], g[1], 0x20);
            v[3] = _mm256_permute2f128_ps(g[2], g[3], 0x20);
            v[4] = _mm256_permute2f128_ps(f[0], f[1], 0x31);
            v[5] = _mm256_permute2f128_ps(f[2], f[3], 0x31);
            v[6] = _mm256_permute2f128_ps(g[0], g[1], 0x31);
            v[7] = _mm256_permute2f128_ps(g[2], g[3], 0x31);
            if (dtype == NF4_F32 && stream) {
                for (int k = 0; k < 8; k++) _mm256_stream_ps((float *)o + 8 * k, v[k]);
            } else if (dtype == NF4_F32) {
                for (int k = 0; k < 8; k++) _mm256_storeu_ps((float *)o + 8 * k, v[k]);
            } else {  /* the table holds fp16-representable values: the conversion is exact */
                for (int k = 0; k < 8; k++) {
                    __m128i h = _mm256_cvtps_ph(v[k], _MM_FROUND_TO_NEAREST_INT);
                    if (stream) _mm_stream_si128((__m128i *)o + k, h);
                    else _mm_storeu_si128((__m128i *)o + k, h);
                }
            }
        }
    }
    if (stream) _mm_sfence();  /* order the streamed stores before the caller reads them */
    nf4_decode_scalar(packed, sc, code16, bs, i, i1, (char *)out + (i - i0) * esize, dtype);
}

static int wants_permuted_x(int64_t k, int64_t bs) { return k % 64 == 0 && bs >= 32; }

/* x reordered per 64-element chunk into the weights' lane order (see the top) */
static void AVX2 permute_x(const float *x, float *xp, int m, int64_t k) {
    for (int mm = 0; mm < m; mm++)
        for (int64_t c = 0; c < k; c += 64)
            for (int p = 0; p < 64; p++) {
                int h = p / 32, v = (p % 32) / 8, j = p % 8;
                int src = 16 * h + 4 * v + (j < 4 ? j : 32 + j - 4);
                xp[mm * k + c + p] = x[mm * k + c + src];
            }
}

AVX2_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* rows [r0, r1) for M rows of x (a compile-time constant after inlining). Each row
 * of x sums into NA accumulators: one chain of dependent FMAs per register would wait
 * on the FMA latency (4-5 cycles) instead of the decode. */
AVX2_INLINE void gemv_m(const int M, const int dtype, const float *xp, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                        const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const __m256i zero = _mm256_setzero_si256();
    enum { NA_MAX = 4 };
    const int NA = M >= 4 ? 1 : (M >= 2 ? 2 : 4);
    for (int64_t r = r0; r < r1; r++) {
        __m256 acc[8][NA_MAX];
        for (int mm = 0; mm < M; mm++)
            for (int a = 0; a < NA; a++) acc[mm][a] = _mm256_setzero_ps();
        tables tb = {.block = -1};
        for (int64_t c = 0; c < k; c += 64) {
            const int64_t i = r * k + c;
            __m256i idx[2];
            if ((c & 127) == 0) _mm_prefetch((const char *)(packed + i / 2 + NF4_PREFETCH_BYTES), _MM_HINT_T0);
            if (dtype == NF4_BF16) chunk_tables_bf16(&tb, sc, code16, bs, i);
            else chunk_tables(&tb, sc, code16, bs, dtype, i);
            chunk_indices(packed + i / 2, &idx[0], &idx[1]);
            for (int h = 0; h < 2; h++) {
                __m256 w[4];
                if (dtype == NF4_BF16) {  /* bf16 -> f32: the 16 bits go on top */
                    __m256i lo, hi;
                    lookup_bf16(&tb, idx[h], &lo, &hi);
                    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, lo));
                    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, lo));
                    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, hi));
                    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, hi));
                } else {
                    lookup_f32(&tb, idx[h], w);
                }
                for (int mm = 0; mm < M; mm++) {
                    const float *xv = xp + mm * k + c + 32 * h;
                    for (int v = 0; v < 4; v++)
                        acc[mm][v % NA] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xv + 8 * v), acc[mm][v % NA]);
                }
            }
        }
        for (int mm = 0; mm < M; mm++) {
            __m256 t = acc[mm][0];
            for (int a = 1; a < NA; a++) t = _mm256_add_ps(t, acc[mm][a]);
            y[mm * ldy + r] = hsum(t);
        }
    }
}

static AVX2 void gemv_avx2(const float *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                           const float *code16, int64_t bs, int dtype, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    if (!wants_permuted_x(k, bs)) { nf4_gemv_scalar(x, m, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); return; }
#define GEMV_CASES(D)                                                                  \
    switch (m) {                                                                       \
        case 1: gemv_m(1, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        case 2: gemv_m(2, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        case 3: gemv_m(3, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        case 4: gemv_m(4, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        case 5: gemv_m(5, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        case 6: gemv_m(6, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        case 7: gemv_m(7, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;      \
        default: gemv_m(8, D, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;     \
    }
    if (dtype == NF4_BF16) { GEMV_CASES(NF4_BF16) }
    else if (dtype == NF4_F16) { GEMV_CASES(NF4_F16) }
    else { GEMV_CASES(NF4_F32) }
#undef GEMV_CASES
}

/* 8 values as float32 */
AVX2_INLINE __m256 load8(const void *x, int dtype, int64_t i) {
    if (dtype == NF4_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (dtype == NF4_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_loadu_ps((const float *)x + i);
}

/* sorted level index of 8 values: #{t : thr[t] < v} */
AVX2_INLINE __m256i levels8(__m256 v, const __m256 *thr) {
    __m256i c = _mm256_setzero_si256();
    for (int t = 0; t < 15; t++) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(v, thr[t], _CMP_GT_OQ)));
    return c;
}

AVX2 void nf4_quantize_avx2(const void *x, int dtype, int64_t b0, int64_t b1, int64_t bs, const float *thr15,
                               const uint8_t *storage16, uint8_t *packed, float *absmax, int *bad) {
    __m256 thr[15];
    for (int t = 0; t < 15; t++) thr[t] = _mm256_set1_ps(thr15[t]);
    const __m128i storage = _mm_loadu_si128((const __m128i *)storage16);
    const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(3.40282347e+38f);
    const __m256 lo = _mm256_set1_ps(-1.0f), hi = _mm256_set1_ps(1.0f);
    __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t b = b0; b < b1; b++) {
        const int64_t base = b * bs;
        __m256 m = _mm256_setzero_ps();
        for (int64_t j = 0; j < bs; j += 8) {
            __m256 a = _mm256_andnot_ps(sign, load8(x, dtype, base + j));
            finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, fmax, _CMP_LE_OQ));
            m = _mm256_max_ps(m, a);
        }
        const float am = nf4_hmax8(m);
        absmax[b] = am;
        const __m256 r = _mm256_set1_ps(1.0f / (am > 1e-38f ? am : 1e-38f));
        for (int64_t j = 0; j < bs; j += 16) {
            __m256 v0 = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8(x, dtype, base + j), r), lo), hi);
            __m256 v1 = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8(x, dtype, base + j + 8), r), lo), hi);
            /* 16 int32 levels -> 16 bytes in element order */
            __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(levels8(v0, thr), levels8(v1, thr)), 0xD8);
            nf4_pack16(_mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)), storage,
                       packed + base / 2 + j / 2);
        }
    }
    if (_mm256_movemask_ps(finite) != 0xFF) *bad = 1;
}

const nf4_kernels nf4_avx2_kernels = {
    .decode = decode_avx2, .gemv = gemv_avx2, .wants_permuted_x = wants_permuted_x, .permute_x = permute_x,
    .quantize = nf4_quantize_avx2, .gemv_bf16 = NULL, .bf16_wants_split = NULL, .split_x_bf16 = NULL,
};

#endif
