/* nf4lib native CPU kernels: AVX2 pieces shared by nf4cpu_avx2.c and nf4cpu_mse.c.
 * Include only where NF4_X86 holds (x86-64 with GCC or Clang). */
#ifndef NF4CPU_AVX2_H
#define NF4CPU_AVX2_H

#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* the largest of 8 floats */
AVX2_INLINE float nf4_hmax8(__m256 m) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* 16 sorted level indices (bytes, element order) -> stored codes, two per byte
 * ((even << 4) | odd), written as 8 bytes at out */
AVX2_INLINE void nf4_pack16(__m128i sorted, __m128i storage, uint8_t *out) {
    __m128i q = _mm_shuffle_epi8(storage, sorted);  /* sorted index -> stored code */
    __m128i pair = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(q, 4), _mm_set1_epi16(0x00F0)), _mm_srli_epi16(q, 8));
    _mm_storel_epi64((__m128i *)out, _mm_packus_epi16(pair, pair));
}

#endif
