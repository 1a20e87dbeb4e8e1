/* nf4lib native CPU kernels: AVX512-BF16 (with AVX512BW), for bf16 activations.
 *
 * A weight pair (elements 2j, 2j+1) is one packed byte (high nibble first). Each byte,
 * widened to a dword, becomes two 16-bit table indices, (b >> 4) | (b & 15) << 16, and
 * `vpermw` looks up 32 bf16 weights per instruction in a block's table
 *
 *     t[j] = bf16(code[j] * absmax[block])      (float32 product, rounded once, as dequantize)
 *
 * which lands them in the memory order of bf16 x, so `vdpbf16ps` multiplies 32 weights by
 * 32 activations and adds pairs into 16 float32 lanes. Products of two bf16 values are exact
 * in float32; only the order of the float32 sums differs from the scalar path (and bf16
 * subnormals, below 1.2e-38, count as zero, as the instruction defines). The other kernels
 * (the float32-activation GEMV, quantize, decode to float32 / fp16) are the AVX-512 ones;
 * the bf16 decode uses the same lookup and stores the 32 weights as they come.
 * nf4lib/backends/cpu/native.py checks this path against the scalar one when the library loads.
 */
#include "nf4cpu.h"

#if NF4_X86
#include <immintrin.h>

#define BF16K __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
#define BF16K_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

/* The block's 16 weights t[j] = bf16(code[j] * a), RNE, NaN -> 0x7FC0 (as nf4_to_bf16), as
 * words 0..15 of a zmm and again as words 16..31 (see weights32). For a finite scale of at
 * least 2^-100 every product is 0 or a normal float32, where `vcvtneps2bf16` rounds exactly
 * as nf4_to_bf16 does (it flushes subnormal inputs, which these scales cannot make); other
 * scales take the bit-exact integer rounding. */
BF16K_INLINE __m512i bf16_table(const float *code16, float a) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code16), _mm512_set1_ps(a));
    __m256i t;
    /* 2^-100 <= a <= FLT_MAX as one unsigned compare of the bits (a predictable branch) */
    if (__builtin_expect(nf4_bits(a) - 0x0D800000u <= 0x7F7FFFFFu - 0x0D800000u, 1)) {  /* bf16_fast_scale */
        t = (__m256i)_mm512_cvtneps_pbh(v);
    } else {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        t = _mm512_cvtepi32_epi16(r);
    }
    return _mm512_broadcast_i64x4(t);
}

/* 32 weights (16 packed bytes at p) as bf16 pairs in element order. Byte b, widened to a
 * dword, gives the index words (b >> 4, b): `vpermw` reads 5 bits of each index, so the high
 * word selects entry b & 31, which the doubled table maps to b & 15. */
BF16K_INLINE __m512i weights32(const uint8_t *p, __m512i table) {
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
    return _mm512_permutexvar_epi16(idx, table);
}

/* rows [r0, r1) for M rows of x (a constant after inlining). Four chunks of 32 per step,
 * unrolled, so each accumulator's index is a constant and the accumulators stay in
 * registers (indexed by a run-time counter they would live on the stack, and every dot
 * product would wait on a store and a load). NA accumulators per row of x: enough
 * independent chains to cover the dot product's latency. */
BF16K_INLINE void gemv_m(const int M, const uint16_t *x, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                         const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    enum { U = 4 };
    const int NA = M <= 2 ? 4 : 2;
    const int bsh = nf4_log2(bs);
    for (int64_t r = r0; r < r1; r++) {
        __m512 acc[8][4];
        for (int mm = 0; mm < M; mm++)
            for (int a = 0; a < NA; a++) acc[mm][a] = _mm512_setzero_ps();
        int64_t block = -1;
        __m512i t = _mm512_setzero_si512();
        int64_t c = 0;
        for (; c + 32 * U <= k; c += 32 * U) {
            _mm_prefetch((const char *)(packed + (r * k + c) / 2 + NF4_PREFETCH_BYTES), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int u = 0; u < U; u++) {
                const int64_t i = r * k + c + 32 * u;  /* a 32-aligned run of 32 lies in one block (bs >= 32) */
                if ((i >> bsh) != block) { block = i >> bsh; t = bf16_table(code16, nf4_block_scale(sc, block)); }
                __m512bh w = (__m512bh)weights32(packed + i / 2, t);
#pragma GCC unroll 8
                for (int mm = 0; mm < M; mm++)
                    acc[mm][u % NA] = _mm512_dpbf16_ps(acc[mm][u % NA], w, (__m512bh)_mm512_loadu_si512(x + mm * k + c + 32 * u));
            }
        }
        for (; c < k; c += 32) {  /* k % 128 leftovers */
            const int64_t i = r * k + c;
            if ((i >> bsh) != block) { block = i >> bsh; t = bf16_table(code16, nf4_block_scale(sc, block)); }
            __m512bh w = (__m512bh)weights32(packed + i / 2, t);
#pragma GCC unroll 8
            for (int mm = 0; mm < M; mm++) acc[mm][0] = _mm512_dpbf16_ps(acc[mm][0], w, (__m512bh)_mm512_loadu_si512(x + mm * k + c));
        }
#pragma GCC unroll 8
        for (int mm = 0; mm < M; mm++) {
            __m512 s = acc[mm][0];
            for (int a = 1; a < NA; a++) s = _mm512_add_ps(s, acc[mm][a]);
            y[mm * ldy + r] = _mm512_reduce_add_ps(s);
        }
    }
}

/* The GEMV for blocksize >= 64 and k % 64 == 0, with x split (split_x_bf16): per 64-element
 * group of a row, its 32 even elements then its 32 odd ones. A group's 32 packed bytes,
 * widened to words, are the odd elements' indices as they are (the doubled table maps
 * b & 31 to b & 15) and, shifted right by 4, the even elements' ones: one widening, one
 * shift and two lookups per 64 weights, against one widening, two shifts, an or and two
 * lookups when the weights must come out in element order. Which pairs `vdpbf16ps` adds
 * first changes; each product is the same exact float32 value. */
/* 1 when `vcvtne2ps2bf16` rounds a block's products as nf4_to_bf16 does (see bf16_table) */
static inline int bf16_fast_scale(float a) { return nf4_bits(a) - 0x0D800000u <= 0x7F7FFFFFu - 0x0D800000u; }

/* Two blocks' tables in one register, [a's 16 words | b's 16 words], converted together (one
 * `vcvtne2ps2bf16` for 32 products, against two conversions and two broadcasts); an index's
 * bit 4 picks the block. */
BF16K_INLINE __m512i bf16_table_pair(const float *code16, float a, float b) {
    if (__builtin_expect(bf16_fast_scale(a) && bf16_fast_scale(b), 1)) {
        const __m512 c = _mm512_loadu_ps(code16);
        return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(c, _mm512_set1_ps(b)), _mm512_mul_ps(c, _mm512_set1_ps(a)));
    }
    return _mm512_mask_blend_epi16(0xFFFF0000u, bf16_table(code16, a), bf16_table(code16, b));
}

/* The tables of two consecutive blocks with scales a and b: *ta = bf16_table_pair (looked up
 * with indices below 16 only); *tb = b's words in both halves, as bf16_table gives them. */
BF16K_INLINE void bf16_tables2(const float *code16, float a, float b, __m512i *ta, __m512i *tb) {
    *ta = bf16_table_pair(code16, a, b);
    *tb = _mm512_shuffle_i64x2(*ta, *ta, 0xEE);
}

/* the dot products of one 64-element group (x's columns from c) with the weights `we`, `wo` */
#define SPLIT_DOTS(g, c, we, wo)                                                                               \
    do {                                                                                                       \
        for (int mm = 0; mm < M; mm++) {                                                                      \
            const uint16_t *xv = xs + mm * k + (c);                                                           \
            acc[mm][(2 * (g)) % NA] = _mm512_dpbf16_ps(acc[mm][(2 * (g)) % NA], we, (__m512bh)_mm512_loadu_si512(xv)); \
            acc[mm][(2 * (g) + 1) % NA] = _mm512_dpbf16_ps(acc[mm][(2 * (g) + 1) % NA], wo, (__m512bh)_mm512_loadu_si512(xv + 32)); \
        }                                                                                                      \
    } while (0)

/* one 64-element group at element i (64-aligned, so in one block) of x's columns from c */
#define SPLIT_GROUP(g, i, c)                                                                                   \
    do {                                                                                                       \
        if (((i) >> bsh) != block) {                                                                          \
            block = (i) >> bsh;                                                                                \
            t = bf16_table(code16, am ? am[block] : nf4_block_scale(sc, block));                              \
        }                                                                                                      \
        __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + (i) / 2)));            \
        __m512bh we = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), t);                         \
        __m512bh wo = (__m512bh)_mm512_permutexvar_epi16(d, t);                                               \
        SPLIT_DOTS(g, c, we, wo);                                                                              \
    } while (0)

BF16K_INLINE void gemv_split_m(const int M, const uint16_t *xs, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                               const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const int NA = M <= 2 ? 4 : 2;  /* independent chains per row of x: 2 groups x (even, odd) */
    const int bsh = nf4_log2(bs);
    const float *am = sc->absmax;
    const __m512i low4 = _mm512_set1_epi16(15);
    for (int64_t r = r0; r < r1; r++) {
        __m512 acc[8][4];
        for (int mm = 0; mm < M; mm++)
            for (int a = 0; a < NA; a++) acc[mm][a] = _mm512_setzero_ps();
        int64_t block = -1;
        __m512i t = _mm512_setzero_si512();
        int64_t c = 0;
        for (; c + 128 <= k; c += 128) {
            const int64_t i = r * k + c;
            /* the bytes (one line per step) and the scales, NF4_PREFETCH_BYTES ahead */
            _mm_prefetch((const char *)(packed + i / 2 + NF4_PREFETCH_BYTES), _MM_HINT_T0);
            if (am) _mm_prefetch((const char *)(am + (i >> bsh) + NF4_PREFETCH_BYTES / 8), _MM_HINT_T0);
            if (bs == 64) {
                /* two blocks per step, their tables converted together; the first block's
                 * odd indices are masked to 4 bits (its table is not doubled) */
                const int64_t b0 = i >> 6;
                __m512i ta, tb;
                bf16_tables2(code16, am ? am[b0] : nf4_block_scale(sc, b0), am ? am[b0 + 1] : nf4_block_scale(sc, b0 + 1), &ta, &tb);
                __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + i / 2)));
                __m512bh we = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), ta);
                __m512bh wo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(d, low4), ta);
                SPLIT_DOTS(0, c, we, wo);
                d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + i / 2 + 32)));
                we = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), tb);
                wo = (__m512bh)_mm512_permutexvar_epi16(d, tb);
                SPLIT_DOTS(1, c + 64, we, wo);
            } else {
                SPLIT_GROUP(0, i, c);
                SPLIT_GROUP(1, i + 64, c + 64);
            }
        }
        if (c < k) SPLIT_GROUP(0, r * k + c, c);  /* k % 128 == 64 */
        for (int mm = 0; mm < M; mm++) {
            __m512 s = acc[mm][0];
            for (int a = 1; a < NA; a++) s = _mm512_add_ps(s, acc[mm][a]);
            y[mm * ldy + r] = _mm512_reduce_add_ps(s);
        }
    }
}
#undef SPLIT_GROUP
#undef SPLIT_DOTS

/* 1 when the bf16 GEMV takes x split (gemv_split_m) for these sizes */
int nf4_bf16_wants_split(int64_t k, int64_t bs) { return k % 64 == 0 && bs >= 64; }

/* x (m x k bf16, k % 64 == 0) into xs: per 64-element group, the even elements then the odd */
BF16K void nf4_split_x_bf16(const uint16_t *x, uint16_t *xs, int m, int64_t k) {
    const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                                          30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t i = 0; i < (int64_t)m * k; i += 64) {
        __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
        _mm512_storeu_si512(xs + i, _mm512_permutex2var_epi16(a, even, b));
        _mm512_storeu_si512(xs + i + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
}

/* Rows [rb, rb + nr) of the weight (k columns), columns [c0, c0 + nc), as bf16 into panel
 * (row stride nc), each 64-column group in the split order gemv_split_m reads x in: its 32
 * even columns, then its 32 odd ones (c0 and nc multiples of 64, bs >= 64). Per 64 weights
 * one widening, one shift and two lookups (against two lookups per 64 for element order,
 * with two shifts and an or more): the AMX GEMM's panels, with x laid out to match.
 * Prefetches the same columns `ahead` rows further on (the caller's next panel). */
BF16K void nf4_decode_split_rows(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs, int64_t k,
                                 int64_t rb, int nr, int64_t c0, int64_t nc, int64_t ahead, uint16_t *panel) {
    const int bsh = nf4_log2(bs);
    const float *am = sc->absmax;
    const __m512i low4 = _mm512_set1_epi16(15);
    for (int ri = 0; ri < nr; ri++) {
        uint16_t *o = panel + ri * nc;
        const int64_t base = (rb + ri) * k + c0;
        if (ahead) {
            for (int64_t c = 0; c < nc; c += 128) _mm_prefetch((const char *)(packed + (base + ahead * k + c) / 2), _MM_HINT_T0);
            if (am) _mm_prefetch((const char *)(am + ((base + ahead * k) >> bsh)), _MM_HINT_T0);
        }
        int64_t c = 0;
        if (bs == 64) {  /* two blocks per step, their tables converted together (as gemv_split_m) */
            for (; c + 128 <= nc; c += 128) {
                const int64_t i = base + c, b0 = i >> 6;
                __m512i ta, tb;
                bf16_tables2(code16, am ? am[b0] : nf4_block_scale(sc, b0), am ? am[b0 + 1] : nf4_block_scale(sc, b0 + 1), &ta, &tb);
                __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + i / 2)));
                _mm512_storeu_si512(o + c, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), ta));
                _mm512_storeu_si512(o + c + 32, _mm512_permutexvar_epi16(_mm512_and_si512(d, low4), ta));
                d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + i / 2 + 32)));
                _mm512_storeu_si512(o + c + 64, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), tb));
                _mm512_storeu_si512(o + c + 96, _mm512_permutexvar_epi16(d, tb));
            }
        }
        int64_t block = -1;
        __m512i t = _mm512_setzero_si512();
        for (; c < nc; c += 64) {  /* a 64-aligned group lies in one block (bs >= 64) */
            const int64_t i = base + c;
            if ((i >> bsh) != block) { block = i >> bsh; t = bf16_table(code16, am ? am[block] : nf4_block_scale(sc, block)); }
            __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(packed + i / 2)));
            _mm512_storeu_si512(o + c, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), t));
            _mm512_storeu_si512(o + c + 32, _mm512_permutexvar_epi16(d, t));
        }
    }
}

/* The AMX backward's weight tiles: W rows [r0, r0 + 2 np) (k columns), columns [c0, c0 + 32)
 * (c0 % 32 == 0, bs >= 32, so each row's 32 columns lie in one block), as tile rows of bf16
 * pairs: even[p][j] = (W[r0 + 2p][c0 + 2j], W[r0 + 2p + 1][c0 + 2j]) and odd[p][j] the same for
 * column c0 + 2j + 1 (16 pairs, 64 bytes, per row p). The two rows' bytes, interleaved and
 * widened to words, index a table holding the first row's block in words 0-15 and the
 * second's in words 16-31 (bit 4 of each index picks the row). */
BF16K void nf4_decode_pairs(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs, int64_t k,
                            int64_t r0, int np, int64_t c0, uint16_t *even, uint16_t *odd) {
    const int bsh = nf4_log2(bs);
    const float *am = sc->absmax;
    const __m512i row1 = _mm512_set1_epi32(16 << 16), low4 = _mm512_set1_epi16(15);
    for (int p = 0; p < np; p++) {
        const int64_t i0 = (r0 + 2 * p) * k + c0, i1 = i0 + k;
        const __m512i t = bf16_table_pair(code16, am ? am[i0 >> bsh] : nf4_block_scale(sc, i0 >> bsh),
                                          am ? am[i1 >> bsh] : nf4_block_scale(sc, i1 >> bsh));
        const __m128i x0 = _mm_loadu_si128((const __m128i *)(packed + i0 / 2));
        const __m128i x1 = _mm_loadu_si128((const __m128i *)(packed + i1 / 2));
        /* word 2j: row 0's byte j, word 2j + 1: row 1's byte j */
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(x0, x1), _mm_unpacklo_epi8(x0, x1)));
        const __m512i ie = _mm512_or_si512(_mm512_srli_epi16(w, 4), row1);   /* high nibbles: even columns */
        const __m512i io = _mm512_ternarylogic_epi32(w, low4, row1, 0xEA);  /* (w & 15) | row1 */
        _mm512_storeu_si512(even + 32 * p, _mm512_permutexvar_epi16(ie, t));
        _mm512_storeu_si512(odd + 32 * p, _mm512_permutexvar_epi16(io, t));
    }
}

/* Elements [i0, i1) as bf16: 32 weights per table lookup, written in element order
 * (other output dtypes and blocksize 16: the AVX-512 decode). */
BF16K void nf4_decode_avx512bf16(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                                 int64_t i0, int64_t i1, void *out, int dtype) {
    if ((dtype & ~NF4_STREAM) != NF4_BF16 || bs < 32) { nf4_decode_avx512(packed, sc, code16, bs, i0, i1, out, dtype); return; }
    const int bsh = nf4_log2(bs);
    int64_t i = (i0 + 31) & ~(int64_t)31;
    if (i > i1) i = i1;
    nf4_decode_scalar(packed, sc, code16, bs, i0, i, out, NF4_BF16);
    int64_t block = -1;
    __m512i t = _mm512_setzero_si512();
    uint16_t *o = (uint16_t *)out - i0;
    /* Plain stores even for a large output (NF4_STREAM): on a 2-core Xeon, decoding 4096x4096
     * into a fresh 32 MiB tensor took 4.5 ms with plain stores and 7.4 ms with streaming ones
     * (the pages are first touched by these stores), and into a touched buffer the same. */
    for (; i + 32 <= i1; i += 32) {  /* a 32-aligned run of 32 lies in one block (bs >= 32) */
        if ((i & 127) == 0) _mm_prefetch((const char *)(packed + i / 2 + NF4_PREFETCH_BYTES), _MM_HINT_T0);
        if ((i >> bsh) != block) { block = i >> bsh; t = bf16_table(code16, nf4_block_scale(sc, block)); }
        _mm512_storeu_si512(o + i, weights32(packed + i / 2, t));
    }
    nf4_decode_scalar(packed, sc, code16, bs, i, i1, o + i, NF4_BF16);
}

/* rows [r0, r1) of y (float32) = W . x for bf16 x (m x k, m <= 8), weights rounded to bf16;
 * needs k % 32 == 0 and bs >= 32 (nf4_gemv checks) */
BF16K void nf4_gemv_bf16_avx512bf16(const uint16_t *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                                    const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    if (nf4_bf16_wants_split(k, bs)) {  /* x arrives split (nf4_gemv calls nf4_split_x_bf16) */
        switch (m) {
            case 1: gemv_split_m(1, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            case 2: gemv_split_m(2, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            case 3: gemv_split_m(3, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            case 4: gemv_split_m(4, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            case 5: gemv_split_m(5, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            case 6: gemv_split_m(6, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            case 7: gemv_split_m(7, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
            default: gemv_split_m(8, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        }
        return;
    }
    switch (m) {
        case 1: gemv_m(1, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        case 2: gemv_m(2, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        case 3: gemv_m(3, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        case 4: gemv_m(4, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        case 5: gemv_m(5, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        case 6: gemv_m(6, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        case 7: gemv_m(7, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
        default: gemv_m(8, x, k, packed, sc, code16, bs, r0, r1, y, ldy); break;
    }
}

#endif
