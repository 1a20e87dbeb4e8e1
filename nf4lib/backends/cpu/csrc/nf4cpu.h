/* nf4lib native CPU kernels: shared declarations.
 *
 * Plain C11, no Python or PyTorch headers: the library is loaded with ctypes, so one
 * build serves every PyTorch version. Every kernel computes what nf4lib's default
 * (pure-PyTorch) kernels compute (nf4lib/backends/default.py), bit for bit:
 *
 *     w[i] = round_to_dtype(code[nibble(i)] * absmax[i / blocksize])   (float32 product)
 *
 * and, for double quantization, absmax[b] = map[codes[b]] * scales[b / group] + offset,
 * a float32 product then a float32 sum (built with -ffp-contract=off, so no fused
 * multiply-add changes a rounding).
 */
#ifndef NF4CPU_H
#define NF4CPU_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NF4_X86 1
#else
#define NF4_X86 0
#endif

/* the exported entry points (built with -fvisibility=hidden) and their ABI, which
 * native.py checks when it loads the library */
#define NF4_API __attribute__((visibility("default")))
#define NF4_ABI_VERSION 7

enum { NF4_F32 = 0, NF4_BF16 = 1, NF4_F16 = 2 };
/* or-ed into a decode's dtype: the output is large, write it past the caches */
enum { NF4_STREAM = 256 };
enum { NF4_ISA_SCALAR = 0, NF4_ISA_AVX2 = 1, NF4_ISA_AVX512 = 2, NF4_ISA_AVX512BF16 = 3, NF4_ISA_AMX = 4 };

/* Per-block scales: a float32 absmax per block, or (absmax == NULL) double-quantized. */
typedef struct {
    const float *absmax;
    const uint8_t *codes;  /* uint8 per block */
    const float *scales;   /* float32 per group of `group` blocks */
    const float *map;      /* the 256-entry 8-bit map */
    float offset;
    int64_t group_shift;   /* log2 of the blocks per scale (a power of two) */
    /* the lengths of the buffers above, in elements: every entry point checks that they
     * cover what it will read, and refuses the call (NF4_EARGS) if not */
    int64_t n_absmax;      /* entries of absmax, or of codes when double-quantized */
    int64_t n_scales;      /* entries of scales (double-quantized) */
    int64_t n_map;         /* entries of map (256) */
} nf4_scales;

/* An entry point's answer to buffers that do not cover its work (never read, never written),
 * and to work the chosen instruction set has no kernel for (nothing written). */
enum { NF4_EARGS = -2, NF4_EUNAVAILABLE = -3 };

/* How far ahead (in packed bytes) the GEMVs prefetch the weight. A weight is read once per
 * call and is cold (a model's other layers have been through the caches since): the
 * hardware prefetchers alone kept too few misses in flight. 28 Llama-shaped layers read in
 * turn, bf16 GEMV, batch 1, 2-core Xeon: 5504x2048 0.76 ms without, 0.58 at 1 KiB ahead,
 * 0.42 from 16 KiB (as fast as when the weight is in cache); 64 KiB gains nothing more. */
#define NF4_PREFETCH_BYTES 16384

/* Blocksizes every kernel serves: the SIMD code reads 16 codes at a time within one block. */
static inline int nf4_blocksize_ok(int64_t bs) { return bs >= 16 && bs <= 65536 && (bs & (bs - 1)) == 0; }

/* 1 when `packed` (packed_len bytes) and `sc` cover elements [0, n) at blocksize bs. */
static inline int nf4_weight_ok(int64_t packed_len, const nf4_scales *sc, int64_t bs, int64_t n) {
    if (!nf4_blocksize_ok(bs) || n < 0 || n > ((int64_t)1 << 62) || packed_len < (n + 1) / 2) return 0;
    const int64_t nb = (n + bs - 1) / bs;
    if (sc->n_absmax < nb) return 0;
    if (sc->absmax) return 1;
    if (!sc->codes || !sc->scales || !sc->map || sc->n_map != 256) return 0;
    if (sc->group_shift < 1 || sc->group_shift > 16) return 0;
    return ((nb + ((int64_t)1 << sc->group_shift) - 1) >> sc->group_shift) <= sc->n_scales;
}

static inline float nf4_block_scale(const nf4_scales *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    float v = s->map[s->codes[b]] * s->scales[b >> s->group_shift];
    return v + s->offset;
}

/* log2 of a power of two (block sizes are: the Python side checks) */
static inline int nf4_log2(int64_t v) { return __builtin_ctzll((unsigned long long)v); }

/* Element i's 4-bit code: even elements sit in the high nibble. */
static inline int nf4_code_at(const uint8_t *packed, int64_t i) {
    uint8_t v = packed[i >> 1];
    return (i & 1) ? (v & 15) : (v >> 4);
}

static inline uint32_t nf4_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float nf4_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7FC0 (as PyTorch's c10::BFloat16). */
static inline uint16_t nf4_to_bf16(float f) {
    uint32_t u = nf4_bits(f);
    if (f != f) return 0x7FC0;
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* float32 -> IEEE half, round to nearest even, overflow to inf (as a float16 cast). */
static inline uint16_t nf4_to_f16(float f) {
    uint32_t x = nf4_bits(f), sign = (x >> 16) & 0x8000, a = x & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (a > 0x7F800000u ? 0x200 : 0));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);      /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                                      /* below 2^-14: subnormal */
        /* 0.5f has an ulp of 2^-24, the half subnormal step: the float add rounds to it */
        float t = nf4_float(a) + 0.5f;
        return (uint16_t)(sign | (nf4_bits(t) - 0x3F000000u));
    }
    a += 0xFFF + ((a >> 13) & 1);                               /* round 23 -> 10 bits */
    return (uint16_t)(sign | ((a - (112u << 23)) >> 13));        /* rebias 127 -> 15 */
}

static inline float nf4_from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) return nf4_float(sign | 0x7F800000u | (m << 13));
    if (e == 0) {  /* zero or subnormal: m * 2^-24, exact in float32 */
        float v = (float)m * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return nf4_float(sign | ((e + 112) << 23) | (m << 13));
}

/* The value as a cast to `dtype` and back to float32 leaves it. */
static inline float nf4_round_as(float v, int dtype) {
    if (dtype == NF4_BF16) return nf4_float((uint32_t)nf4_to_bf16(v) << 16);
    if (dtype == NF4_F16) return nf4_from_f16(nf4_to_f16(v));
    return v;
}

static inline float nf4_load(const void *x, int dtype, int64_t i) {
    if (dtype == NF4_BF16) return nf4_float((uint32_t)((const uint16_t *)x)[i] << 16);
    if (dtype == NF4_F16) return nf4_from_f16(((const uint16_t *)x)[i]);
    return ((const float *)x)[i];
}

/* Kernels, one set per instruction set. `out` points at element i0. */
typedef struct {
    void (*decode)(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                   int64_t i0, int64_t i1, void *out, int dtype);
    /* rows [r0, r1) of y (m x ldy, float32) = W[rows] . x, x float32 (m x k) in the
     * order prepare_x gives it; each weight rounded to `dtype` first */
    void (*gemv)(const float *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                 const float *code16, int64_t bs, int dtype, int64_t r0, int64_t r1, float *y, int64_t ldy);
    /* 1 if gemv takes x permuted (see nf4cpu_avx2.c) for these sizes, and the permutation
     * (xp: m x k floats); NULL where gemv reads x as it is */
    int (*wants_permuted_x)(int64_t k, int64_t bs);
    void (*permute_x)(const float *x, float *xp, int m, int64_t k);
    /* full blocks [b0, b1); sets *bad when a value is NaN or Inf */
    void (*quantize)(const void *x, int dtype, int64_t b0, int64_t b1, int64_t bs, const float *thr15,
                     const uint8_t *storage16, uint8_t *packed, float *absmax, int *bad);
    /* the GEMV for bf16 x (m x k, bf16 bits) with bf16-rounded weights, or NULL; needs
     * k % 32 == 0 and bs >= 32 */
    void (*gemv_bf16)(const uint16_t *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                      const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy);
    /* NULL, or: 1 if gemv_bf16 takes x rearranged for these sizes, and the rearrangement
     * (xs: m x k bf16) */
    int (*bf16_wants_split)(int64_t k, int64_t bs);
    void (*split_x_bf16)(const uint16_t *x, uint16_t *xs, int m, int64_t k);
    /* NULL, or the bf16 GEMM that takes every row of x at once (in place of gemv_bf16 from
     * NF4_GEMM_MIN_ROWS rows), x in the layout gemm_x gives it for the weight's blocksize
     * (gemm_x_elems(m, k) elements); returns 0, or -1 when out of memory. Needs k % 32 == 0
     * and bs >= 32. */
    int (*gemm_bf16)(const uint16_t *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                     const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy);
    void (*gemm_x)(const uint16_t *x, uint16_t *xs, int m, int64_t k, int64_t bs);
    int64_t (*gemm_x_elems)(int m, int64_t k);
    /* NULL, or the backward's y (m x k) = g (m x n, bf16; rows readable up to a multiple of
     * 16) @ W for y's columns [c0, c0 + nc) (nc a multiple of 32, at most NF4_GEMM_T_COLS);
     * needs n % 32 == 0, k % 32 == 0, bs >= 32; returns 0, or -1 when out of memory */
    int (*gemm_t_bf16)(const uint16_t *g, int m, int64_t n, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                       const float *code16, int64_t bs, int64_t c0, int64_t nc, float *y);
} nf4_kernels;

/* Rows of x from which the bf16 GEMM (where the table has one) replaces the bf16 GEMV, which
 * makes each weight's products once per row of x where the GEMM decodes each weight once.
 * 2-core Xeon, 4096x4096 bf16, GEMV -> GEMM: 2 rows 0.82-0.85 ms either way, 3 rows
 * 1.02-1.09 -> 0.82-0.89, 4 rows 1.25-1.61 -> 0.86-0.92 (1 row: the GEMV, 0.63-0.70). */
#define NF4_GEMM_MIN_ROWS 3
/* Rows of x per pass of the GEMM (a multiple of 16; gemm_x's layout of x then starts pass p
 * at element p * NF4_GEMM_MAX_ROWS * k, as plain rows would). With more rows at once, x's
 * column chunks (kept in L2) grow short and the sums' traffic dominates: 2-core Xeon,
 * 4096x4096, 1024 rows in one pass 33 ms, in passes of 256 rows (the weight decoded four
 * times) about 27 ms. */
#define NF4_GEMM_MAX_ROWS 256
/* Columns of y per call of the backward's GEMM (gemm_t_bf16): 128 columns of a weight row are
 * one 64-byte line of its codes */
#define NF4_GEMM_T_COLS 128

extern const nf4_kernels nf4_scalar_kernels;
#if NF4_X86
extern const nf4_kernels nf4_avx2_kernels;
extern const nf4_kernels nf4_avx512_kernels;
extern const nf4_kernels nf4_avx512bf16_kernels;
extern const nf4_kernels nf4_amx_kernels;
void nf4_decode_avx512(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                       int64_t i0, int64_t i1, void *out, int dtype);
void nf4_decode_avx512bf16(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                           int64_t i0, int64_t i1, void *out, int dtype);
/* the bf16 GEMV takes x split per 64-element group (even elements, then odd) where
 * nf4_bf16_wants_split(k, bs); nf4_split_x_bf16 makes that layout */
int nf4_bf16_wants_split(int64_t k, int64_t bs);
void nf4_split_x_bf16(const uint16_t *x, uint16_t *xs, int m, int64_t k);
/* rows [rb, rb + nr), columns [c0, c0 + nc) of the weight as bf16, each 64-column group split
 * (its even columns, then its odd), for the AMX GEMM; prefetches `ahead` rows further on */
void nf4_decode_split_rows(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs, int64_t k,
                           int64_t rb, int nr, int64_t c0, int64_t nc, int64_t ahead, uint16_t *panel);
/* W rows [r0, r0 + 2 np), columns [c0, c0 + 32) as tile rows of bf16 row pairs, the even and
 * the odd columns apart, for the AMX backward */
void nf4_decode_pairs(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs, int64_t k,
                      int64_t r0, int np, int64_t c0, uint16_t *even, uint16_t *odd);
void nf4_gemv_bf16_avx512bf16(const uint16_t *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                              const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy);
/* nf4cpu_amx.c: the AMX bf16 GEMM and its layout of x, and the backward's GEMM */
int nf4_gemm_t_bf16_amx(const uint16_t *g, int m, int64_t n, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                        const float *code16, int64_t bs, int64_t c0, int64_t nc, float *y);
int64_t nf4_amx_vnni_elems(int m, int64_t k);
void nf4_vnni_x_bf16(const uint16_t *x, uint16_t *xv, int m, int64_t k, int64_t bs);
int nf4_gemm_bf16_amx(const uint16_t *xv, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                      const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy);
void nf4_quantize_avx2(const void *x, int dtype, int64_t b0, int64_t b1, int64_t bs, const float *thr15,
                       const uint8_t *storage16, uint8_t *packed, float *absmax, int *bad);
#endif

/* nf4cpu_api.c's runtime, for the other files' entry points: the kernel table of the
 * instruction set in use, and tasks [0, ntasks) run on up to nthreads threads */
int nf4_current_isa(void);
const nf4_kernels *nf4_kernels_in_use(void);
void nf4_parallel_for(void (*fn)(void *ctx, int64_t task), void *ctx, int64_t ntasks, int nthreads);

/* scalar pieces the SIMD kernels use for heads, tails and odd shapes */
void nf4_decode_scalar(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                       int64_t i0, int64_t i1, void *out, int dtype);
void nf4_gemv_scalar(const float *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                     const float *code16, int64_t bs, int dtype, int64_t r0, int64_t r1, float *y, int64_t ldy);
void nf4_quantize_scalar(const void *x, int dtype, int64_t b0, int64_t b1, int64_t bs, const float *thr15,
                         const uint8_t *storage16, uint8_t *packed, float *absmax, int *bad);
/* the partial last block [i0, n): bitsandbytes divides by the clamped absmax and pads an
 * odd count with one 0 */
void nf4_quantize_tail(const void *x, int dtype, int64_t i0, int64_t n, const float *thr15,
                       const uint8_t *storage16, uint8_t *packed, float *absmax_out, int *bad);
int nf4_level(float v, const float *thr15);

#endif
