/* nf4lib native CPU kernels: the portable scalar path, written element by element in
 * the order of operations of nf4lib's default (pure-PyTorch) kernels
 * (nf4lib/backends/default.py). The AVX2 / AVX-512 files compute the same values faster
 * and use these for heads, tails and odd shapes; nf4cpu_api.c dispatches between them.
 */
#include "nf4cpu.h"

/* Sorted level index: #{t : thr[t] < v}, so a value on a threshold goes to the lower level. */
int nf4_level(float v, const float *thr15) {
    int c = 0;
    for (int t = 0; t < 15; t++) c += v > thr15[t];
    return c;
}

void nf4_decode_scalar(const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs,
                       int64_t i0, int64_t i1, void *out, int dtype) {
    const int bsh = nf4_log2(bs);
    dtype &= ~NF4_STREAM;
    int64_t block = -1;
    float a = 0.0f;
    for (int64_t i = i0; i < i1; i++) {
        if ((i >> bsh) != block) { block = (i >> bsh); a = nf4_block_scale(sc, block); }
        float w = code16[nf4_code_at(packed, i)] * a;  /* w = code[q] * absmax, float32 */
        if (dtype == NF4_BF16) ((uint16_t *)out)[i - i0] = nf4_to_bf16(w);
        else if (dtype == NF4_F16) ((uint16_t *)out)[i - i0] = nf4_to_f16(w);
        else ((float *)out)[i - i0] = w;
    }
}

void nf4_gemv_scalar(const float *x, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                     const float *code16, int64_t bs, int dtype, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const int bsh = nf4_log2(bs);
    for (int64_t r = r0; r < r1; r++) {
        float acc[8] = {0};
        int64_t block = -1;
        float a = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t i = r * k + j;
            if ((i >> bsh) != block) { block = (i >> bsh); a = nf4_block_scale(sc, block); }
            float w = nf4_round_as(code16[nf4_code_at(packed, i)] * a, dtype);
            for (int mm = 0; mm < m; mm++) acc[mm] += w * x[mm * k + j];
        }
        for (int mm = 0; mm < m; mm++) y[mm * ldy + r] = acc[mm];
    }
}

void nf4_quantize_scalar(const void *x, int dtype, int64_t b0, int64_t b1, int64_t bs, const float *thr15,
                         const uint8_t *storage16, uint8_t *packed, float *absmax, int *bad) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t base = b * bs;
        float am = 0.0f;
        for (int64_t j = 0; j < bs; j++) {
            float v = nf4_load(x, dtype, base + j), av = v < 0 ? -v : v;
            if (!(av <= 3.40282347e+38f)) *bad = 1;  /* NaN or Inf */
            if (av > am) am = av;
        }
        absmax[b] = am;
        /* bitsandbytes' rule for full blocks: multiply by the float32 reciprocal */
        const float r = 1.0f / (am > 1e-38f ? am : 1e-38f);
        for (int64_t j = 0; j < bs; j += 2) {
            int q[2];
            for (int h = 0; h < 2; h++) {
                float v = nf4_load(x, dtype, base + j + h) * r;
                v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                q[h] = storage16[nf4_level(v, thr15)];
            }
            packed[(base + j) / 2] = (uint8_t)((q[0] << 4) | q[1]);
        }
    }
}

/* The partial last block [i0, n): bitsandbytes divides by the clamped absmax and pads
 * an odd count with one 0. */
void nf4_quantize_tail(const void *x, int dtype, int64_t i0, int64_t n, const float *thr15,
                       const uint8_t *storage16, uint8_t *packed, float *absmax_out, int *bad) {
    float am = 0.0f;
    for (int64_t i = i0; i < n; i++) {
        float v = nf4_load(x, dtype, i), av = v < 0 ? -v : v;
        if (!(av <= 3.40282347e+38f)) *bad = 1;
        if (av > am) am = av;
    }
    am = am > 1e-38f ? am : 1e-38f;
    *absmax_out = am;
    for (int64_t i = i0; i < n; i += 2) {
        int q[2];
        for (int h = 0; h < 2; h++) {
            float v = i + h < n ? nf4_load(x, dtype, i + h) / am : 0.0f;
            v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            q[h] = storage16[nf4_level(v, thr15)];
        }
        packed[i / 2] = (uint8_t)((q[0] << 4) | q[1]);
    }
}

static int no_permute(int64_t k, int64_t bs) { (void)k; (void)bs; return 0; }

const nf4_kernels nf4_scalar_kernels = {
    .decode = nf4_decode_scalar, .gemv = nf4_gemv_scalar, .wants_permuted_x = no_permute, .permute_x = NULL,
    .quantize = nf4_quantize_scalar, .gemv_bf16 = NULL, .bf16_wants_split = NULL, .split_x_bf16 = NULL,
};
