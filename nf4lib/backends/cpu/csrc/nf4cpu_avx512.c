/* nf4lib native CPU kernels: AVX-512F.
 *
 * A block's 16 possible weights t[j] = round_to_dtype(code[j] * absmax) fit one zmm
 * register, and `vpermps` (_mm512_permutexvar_ps) looks up 16 codes per instruction,
 * in element order. Quantize uses the AVX2 kernel (it is compute-light either way).
 * nf4lib/backends/cpu/native.py checks this path against the scalar one when it loads the library
 * and falls back to AVX2 if they disagree.
 */
#include "nf4cpu.h"

#if NF4_X86
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx2,fma,f16c")))

AVX512_INLINE __m512 table_of(const float *code16, float a, int dtype) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(code16), _mm512_set1_ps(a));
    if (dtype == NF4_BF16) {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u));
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000));
        return _mm512_castsi512_ps(r);
    }
    if (dtype == NF4_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

/* code indices of 16 elements (8 packed bytes), in element order */
AVX512_INLINE __m512i indices16(const uint8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
}

AVX512 void nf4_decode_avx512(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                                 int64_t i0, int64_t i1, void *out, int dtype) {
    dtype &= ~NF4_STREAM;  /* plain stores: this path is not tuned (no AVX-512 machine to measure on) */
    const int esize = dtype == NF4_F32 ? 4 : 2, bsh = nf4_log2(bs);
    int64_t i = (i0 + 15) & ~(int64_t)15;
    if (i > i1) i = i1;
    nf4_decode_scalar(packed, sc, code16, bs, i0, i, out, dtype);
    int64_t block = -1;
    __m512 t = _mm512_setzero_ps();
    for (; i + 16 <= i1; i += 16) {  /* a 16-aligned run of 16 lies in one block (bs >= 16) */
        if ((i >> bsh) != block) { block = (i >> bsh); t = table_of(code16, nf4_block_scale(sc, block), dtype); }
        __m512 w = _mm512_permutexvar_ps(indices16(packed + i / 2), t);
        char *o = (char *)out + (i - i0) * esize;
        if (dtype == NF4_F32) _mm512_storeu_ps(o, w);
        else if (dtype == NF4_BF16)
            _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
        else _mm256_storeu_si256((__m256i *)o, _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
    }
    nf4_decode_scalar(packed, sc, code16, bs, i, i1, (char *)out + (i - i0) * esize, dtype);
}

static int natural_x(int64_t k, int64_t bs) { (void)k; (void)bs; return 0; }

AVX512_INLINE void gemv_m(const int M, const float *x, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                          const float *code16, int64_t bs, int dtype, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const int bsh = nf4_log2(bs);
    for (int64_t r = r0; r < r1; r++) {
        /* two accumulators per row of x, one per chunk of a pair (FMA latency, not the
         * decode, would bound a single chain); the pair is unrolled so that each
         * accumulator's index is a constant and it stays in a register */
        __m512 acc[8][2];
        for (int mm = 0; mm < M; mm++) acc[mm][0] = acc[mm][1] = _mm512_setzero_ps();
        int64_t block = -1;
        __m512 t = _mm512_setzero_ps();
        for (int64_t c = 0; c < k; c += 32) {
            if ((c & 127) == 0) _mm_prefetch((const char *)(packed + (r * k + c) / 2 + NF4_PREFETCH_BYTES), _MM_HINT_T0);
#pragma GCC unroll 2
            for (int a = 0; a < 2; a++) {
                if (a == 1 && c + 16 >= k) break;  /* k % 32 == 16 */
                const int64_t i = r * k + c + 16 * a;
                if ((i >> bsh) != block) { block = (i >> bsh); t = table_of(code16, nf4_block_scale(sc, block), dtype); }
                __m512 w = _mm512_permutexvar_ps(indices16(packed + i / 2), t);
#pragma GCC unroll 8
                for (int mm = 0; mm < M; mm++) acc[mm][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + mm * k + c + 16 * a), acc[mm][a]);
            }
        }
        for (int mm = 0; mm < M; mm++) y[mm * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[mm][0], acc[mm][1]));
    }
}

static AVX512 void gemv_avx512(const float *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                               const float *code16, int64_t bs, int dtype, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    if (k % 16) { nf4_gemv_scalar(x, m, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); return; }
    switch (m) {
        case 1: gemv_m(1, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        case 2: gemv_m(2, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        case 3: gemv_m(3, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        case 4: gemv_m(4, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        case 5: gemv_m(5, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        case 6: gemv_m(6, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        case 7: gemv_m(7, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
        default: gemv_m(8, x, k, packed, sc, code16, bs, dtype, r0, r1, y, ldy); break;
    }
}

const nf4_kernels nf4_avx512_kernels = {
    .decode = nf4_decode_avx512, .gemv = gemv_avx512, .wants_permuted_x = natural_x, .permute_x = NULL,
    .quantize = nf4_quantize_avx2, .gemv_bf16 = NULL, .bf16_wants_split = NULL, .split_x_bf16 = NULL,
};
/* the same, plus nf4cpu_avx512bf16.c's bf16 decode and bf16-activation GEMV */
const nf4_kernels nf4_avx512bf16_kernels = {
    .decode = nf4_decode_avx512bf16, .gemv = gemv_avx512, .wants_permuted_x = natural_x, .permute_x = NULL,
    .quantize = nf4_quantize_avx2, .gemv_bf16 = nf4_gemv_bf16_avx512bf16,
    .bf16_wants_split = nf4_bf16_wants_split, .split_x_bf16 = nf4_split_x_bf16,
};
/* the same, plus nf4cpu_amx.c's bf16 GEMM on AMX tiles (from NF4_GEMM_MIN_ROWS rows of x) */
const nf4_kernels nf4_amx_kernels = {
    .decode = nf4_decode_avx512bf16, .gemv = gemv_avx512, .wants_permuted_x = natural_x, .permute_x = NULL,
    .quantize = nf4_quantize_avx2, .gemv_bf16 = nf4_gemv_bf16_avx512bf16,
    .bf16_wants_split = nf4_bf16_wants_split, .split_x_bf16 = nf4_split_x_bf16,
    .gemm_bf16 = nf4_gemm_bf16_amx, .gemm_x = nf4_vnni_x_bf16, .gemm_x_elems = nf4_amx_vnni_elems,
    .gemm_t_bf16 = nf4_gemm_t_bf16_amx,
};

#endif
