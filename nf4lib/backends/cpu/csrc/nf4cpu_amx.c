/* nf4lib native CPU kernels: the bf16 GEMM on AMX tiles (AMX-TILE + AMX-BF16), for bf16
 * activations with bf16-rounded weights, any number of rows of x.
 *
 * For each run of 32 output rows, a chunk of columns at a time, the weight is decoded as the
 * bf16 decode writes it,
 *
 *     panel[i][c] = bf16(code[q(r + i, c)] * absmax[block])    (dequantize's value)
 *
 * (with blocksize >= 64 and k % 64 == 0 in split column order, see nf4_vnni_x_bf16)
 * into a per-thread buffer that stays in the core's cache, and `tdpbf16ps` multiplies
 * 16 x 32 tiles of it by x, which the call has laid out once in the tile's pair order
 * ("VNNI": tile row j holds, for 16 rows of x, the pair x[m][2j], x[m][2j + 1]):
 *
 *     C[i][m] += sum over c of panel[i][c] * x[m][c]            (float32 sums)
 *
 * Products of two bf16 values are exact in float32; the order of the float32 sums differs
 * from the scalar path, and bf16 subnormals count as zero, as the instruction defines.
 * One panel serves every row of x, so the decode is paid once per weight whatever the
 * batch, and the multiply runs at the AMX unit's rate instead of one dot product per 32
 * weights per row (the AVX512-BF16 GEMV, which re-reads the weight per 8 rows of x).
 * Linux hands out AMX state only on request (arch_prctl, nf4cpu_api.c asks once);
 * native.py checks this path against the scalar one when the library loads.
 */
#include "nf4cpu.h"

#if NF4_X86
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define AMXK __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")))

/* palette 1: tmm0-3 the float32 sums (16 x 16), tmm4-5 the weights (16 rows x 32 bf16),
 * tmm6-7 x (16 pair rows x 16 rows of x) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* The thread's scratch, kept between calls: a 32-row panel of a column chunk of the weight
 * and the float32 sums of the rows in flight (at most ~768 KiB with the sizes below), freed
 * when the thread exits (a thread-specific key with a destructor). */
typedef struct {
    size_t cap;
    void *buf;
} scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok = 0;

static void scratch_free(void *p) {
    scratch *s = p;
    free(s->buf);
    free(s);
}

static void scratch_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0; }

static void *scratch_of(size_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_key_ok) return NULL;
    bytes = (bytes + 63) / 64 * 64;
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap < bytes) {
        free(s->buf);
        s->buf = aligned_alloc(64, bytes);
        s->cap = s->buf ? bytes : 0;
    }
    return s->buf;
}

/* Blocking. x is read in column chunks of about X_CHUNK_BYTES (all its rows), so that a
 * chunk stays in the core's L2 cache while every run of 32 weight rows is multiplied by it;
 * the float32 sums of the rows in flight (about SUMS_BYTES) stay there too. */
#define X_CHUNK_BYTES (256 << 10)
#define SUMS_BYTES (256 << 10)

/* Elements of the VNNI copy of an m x k x: rows padded to a multiple of 16 (with zeros). */
int64_t nf4_amx_vnni_elems(int m, int64_t k) { return ((int64_t)m + 15) / 16 * 16 * k; }

/* x (m x k bf16, k % 32 == 0) into xv: per group of 16 rows g and 32 columns c, one 1 KiB
 * tile, xv[((g * k / 32 + c) * 16 + j) * 16 + i] = the pair of row 16g + i at the panel's
 * columns 32c + 2j and 32c + 2j + 1, as 32-bit words (zero for rows past m). In element
 * order that is (x[32c + 2j], x[32c + 2j + 1]). Where the GEMV takes x split
 * (nf4_bf16_wants_split), the panels are split too (nf4_decode_split_rows), and column
 * 32c + q of the panel is element 64(c / 2) + 2q + (c % 2) of x. */
void nf4_vnni_x_bf16(const uint16_t *x, uint16_t *xv, int m, int64_t k, int64_t bs) {
    const int64_t kt = k / 32, groups = ((int64_t)m + 15) / 16;
    const int split = nf4_bf16_wants_split(k, bs);
    uint32_t *out = (uint32_t *)xv;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t c = 0; c < kt; c++) {
            uint32_t *tile = out + (g * kt + c) * 256;
            for (int i = 0; i < 16; i++) {
                const int64_t row = g * 16 + i;
                if (row >= m) {
                    for (int j = 0; j < 16; j++) tile[j * 16 + i] = 0;
                } else if (split) {
                    const uint16_t *xr = x + row * k + (c / 2) * 64 + (c % 2);
                    for (int j = 0; j < 16; j++) tile[j * 16 + i] = (uint32_t)xr[4 * j] | (uint32_t)xr[4 * j + 2] << 16;
                } else {
                    uint32_t pairs[16];
                    memcpy(pairs, x + row * k + c * 32, sizeof pairs);
                    for (int j = 0; j < 16; j++) tile[j * 16 + i] = pairs[j];
                }
            }
        }
}

/* panel[i][0 .. nc) = weight row rb + i, columns [c0, c0 + nc), for i < nr; zeros for the
 * rows up to 32. Split or in element order, as nf4_bf16_wants_split says. */
static void fill_panel(int split, const uint8_t *packed, const nf4_scales *sc, const float *code16, int64_t bs, int64_t k,
                       int64_t rb, int nr, int64_t c0, int64_t nc, int64_t ahead, uint16_t *panel) {
    if (split) {
        nf4_decode_split_rows(packed, sc, code16, bs, k, rb, nr, c0, nc, ahead, panel);
    } else {
        for (int i = 0; i < nr; i++)
            nf4_decode_avx512bf16(packed, sc, code16, bs, (rb + i) * k + c0, (rb + i) * k + c0 + nc, panel + i * nc, NF4_BF16);
    }
    if (nr < 32) memset(panel + nr * nc, 0, sizeof(uint16_t) * (size_t)((32 - nr) * nc));
}

static AMXK void tiles_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* Columns per panel of the few-rows GEMM: 32 weight rows x 256 columns of bf16 is 16 KiB,
 * which stays in L1 between its decode and its tile loads. */
#define FEW_CH 256

/* The GEMM for at most 32 rows of x (two groups of 16): the four sums tiles stay in tile
 * registers for a whole run of 32 weight rows, so each panel is decoded, multiplied and
 * dropped, and only x's tiles are read again. At this size the decode, not the multiply,
 * sets the speed, once per weight whatever the rows (2-core Xeon, 4096x4096, one thread: 4
 * rows of x 1.1 ms here against 1.9 for the GEMV, whose dot products grow with the rows). */
static AMXK int gemm_few(const uint16_t *xv, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                         const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    const int64_t kt = k / 32;
    const int two = m > 16, split = nf4_bf16_wants_split(k, bs);
    uint8_t *mem = scratch_of(sizeof(uint16_t) * 32 * FEW_CH + sizeof(float) * 4 * 256);
    if (!mem) return -1;
    uint16_t *panel = (uint16_t *)mem;
    float *sums = (float *)(mem + sizeof(uint16_t) * 32 * FEW_CH);
    tiles_config();
    for (int64_t rb = r0; rb < r1; rb += 32) {
        const int nr = r1 - rb < 32 ? (int)(r1 - rb) : 32, has1 = nr > 16;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t c0 = 0; c0 < k; c0 += FEW_CH) {
            const int64_t nc = k - c0 < FEW_CH ? k - c0 : FEW_CH;  /* a multiple of 64 when split */
            fill_panel(split, packed, sc, code16, bs, k, rb, nr, c0, nc, rb + 64 <= r1 ? 32 : 0, panel);
            const uint16_t *xb0 = xv + (c0 / 32) * 512, *xb1 = xb0 + kt * 512;
            for (int64_t kc = 0; kc < nc / 32; kc++) {
                _tile_loadd(4, panel + kc * 32, nc * 2);
                _tile_loadd(6, xb0 + kc * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (has1) { _tile_loadd(5, panel + 16 * nc + kc * 32, nc * 2); _tile_dpbf16ps(2, 5, 6); }
                if (two) {
                    _tile_loadd(7, xb1 + kc * 512, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    if (has1) _tile_dpbf16ps(3, 5, 7);
                }
            }
        }
        /* tile 2h + g holds y[16 g + mi][rb + 16 h + i] at [i][mi] */
        _tile_stored(0, sums, 64);
        if (two) _tile_stored(1, sums + 256, 64);
        if (has1) _tile_stored(2, sums + 512, 64);
        if (has1 && two) _tile_stored(3, sums + 768, 64);
        for (int row = 0; row < m; row++)
            for (int i = 0; i < nr; i++) y[row * ldy + rb + i] = sums[(2 * (i / 16) + row / 16) * 256 + (i % 16) * 16 + row % 16];
    }
    _tile_release();
    return 0;
}

/* y[mm][r] for rows [r0, r1) of the weight, every row of x; xv from nf4_vnni_x_bf16.
 * Returns 0, or -1 if the thread's scratch could not be allocated (nothing computed). */
AMXK int nf4_gemm_bf16_amx(const uint16_t *xv, int m, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                           const float *code16, int64_t bs, int64_t r0, int64_t r1, float *y, int64_t ldy) {
    if (m <= 32) return gemm_few(xv, m, k, packed, sc, code16, bs, r0, r1, y, ldy);
    const int64_t kt = k / 32, groups = ((int64_t)m + 15) / 16;
    const int split = nf4_bf16_wants_split(k, bs);
    /* k chunk: kc32 tiles of 32 columns (an even number when split: whole 64-column groups) */
    int64_t kc32 = X_CHUNK_BYTES / (groups * 1024);
    kc32 = kc32 < 1 ? 1 : (kc32 > kt ? kt : kc32);
    if (split) kc32 = kc32 < 2 ? 2 : kc32 & ~(int64_t)1;  /* kt is even */
    /* rows in flight: an even number of runs of 16 rows whose sums fit SUMS_BYTES */
    int64_t sub = SUMS_BYTES / (groups * 1024) / 2 * 2;
    sub = sub < 2 ? 2 : sub;
    const int64_t panel_elems = 32 * kc32 * 32, sums_elems = sub * groups * 256;
    uint8_t *mem = scratch_of(sizeof(uint16_t) * (size_t)panel_elems + 64 + sizeof(float) * (size_t)sums_elems);
    if (!mem) return -1;
    uint16_t *panel = (uint16_t *)mem;
    float *sums = (float *)(mem + ((sizeof(uint16_t) * (size_t)panel_elems + 63) / 64 * 64));
    tiles_config();
    for (int64_t s0 = r0; s0 < r1; s0 += 16 * sub) {
        const int64_t s1 = s0 + 16 * sub < r1 ? s0 + 16 * sub : r1;
        for (int64_t c0 = 0; c0 < kt; c0 += kc32) {
            const int64_t nc = kt - c0 < kc32 ? kt - c0 : kc32;  /* 32-column tiles in this chunk */
            const int64_t pstride = nc * 32 * (int64_t)sizeof(uint16_t);
            /* two runs of 16 rows at a time (tmm4, tmm5) against two groups of 16 rows of x
             * (tmm6, tmm7): four sums tiles, each tile load serving two products */
            for (int64_t rb = s0; rb < s1; rb += 32) {
                const int nr = s1 - rb < 32 ? (int)(s1 - rb) : 32, has1 = nr > 16;
                fill_panel(split, packed, sc, code16, bs, k, rb, nr, c0 * 32, nc * 32, 0, panel);  /* W[rb + i][32 c0 ..] */
                const uint16_t *panel1 = panel + 16 * nc * 32;
                float *acc0 = sums + (rb - s0) / 16 * groups * 256, *acc1 = acc0 + groups * 256;
                for (int64_t g = 0; g < groups; g += 2) {
                    const int two = g + 1 < groups;
                    float *a00 = acc0 + g * 256, *a01 = a00 + 256, *a10 = acc1 + g * 256, *a11 = a10 + 256;
                    if (c0 == 0) {
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    } else {
                        _tile_loadd(0, a00, 64);
                        if (two) _tile_loadd(1, a01, 64);
                        if (has1) _tile_loadd(2, a10, 64);
                        if (has1 && two) _tile_loadd(3, a11, 64);
                    }
                    const uint16_t *xb0 = xv + (g * kt + c0) * 512, *xb1 = xb0 + kt * 512;
                    for (int64_t kc = 0; kc < nc; kc++) {
                        _tile_loadd(4, panel + kc * 32, pstride);
                        _tile_loadd(6, xb0 + kc * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        if (has1) { _tile_loadd(5, panel1 + kc * 32, pstride); _tile_dpbf16ps(2, 5, 6); }
                        if (two) {
                            _tile_loadd(7, xb1 + kc * 512, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            if (has1) _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, a00, 64);
                    if (two) _tile_stored(1, a01, 64);
                    if (has1) _tile_stored(2, a10, 64);
                    if (has1 && two) _tile_stored(3, a11, 64);
                }
            }
        }
        /* sums[run][g][i][mi] is y[16 g + mi][16 run + s0 + i] */
        for (int64_t rb = s0; rb < s1; rb += 16) {
            const int nr = s1 - rb < 16 ? (int)(s1 - rb) : 16;
            const float *acc = sums + (rb - s0) / 16 * groups * 256;
            for (int64_t row = 0; row < m; row++) {
                const float *c = acc + row / 16 * 256 + row % 16;
                for (int i = 0; i < nr; i++) y[row * ldy + rb + i] = c[i * 16];
            }
        }
    }
    _tile_release();
    return 0;
}

#endif

#if NF4_X86
/* The backward's product, dL/dx = dL/dy @ W: y (m x k, float32) = g (m x n, bf16) @ W (n x k),
 * each weight bf16(code * absmax) as dequantize gives it, for y's columns [c0, c0 + nc) (nc a
 * multiple of 32, at most BT_COLS). g is the tiles' left factor as it is (16 rows of g by 32
 * of its columns per tile); W comes as tiles of row pairs (nf4_decode_pairs), BT_ROWS rows at
 * a time, each 32 columns' even and odd columns in two tiles, so that one load of each serves
 * two groups of 16 rows of g:
 *
 *     C[i][c] += sum over p of (g[i][2p] W[2p][c] + g[i][2p + 1] W[2p + 1][c])   (float32)
 *
 * Each weight is decoded once, and BT_COLS = 128 columns use whole 64-byte lines of the codes;
 * g is read once per BT_COLS columns of y. g has m rows rounded up to 16 (the caller pads
 * with zeros); y gets m rows. Returns 0, or -1 if the thread's scratch could not be allocated. */
#define BT_ROWS 512
#define BT_COLS NF4_GEMM_T_COLS
AMXK int nf4_gemm_t_bf16_amx(const uint16_t *g, int m, int64_t n, int64_t k, const uint8_t *packed, const nf4_scales *sc,
                             const float *code16, int64_t bs, int64_t c0, int64_t nc, float *y) {
    const int groups = (m + 15) / 16, nsub = (int)(nc / 32);
    /* per 32 columns: BT_ROWS / 2 pair rows of 64 bytes, even then odd */
    const size_t sub_elems = (size_t)BT_ROWS * 32, panel_bytes = sizeof(uint16_t) * sub_elems * (BT_COLS / 32);
    uint8_t *mem = scratch_of(panel_bytes + (size_t)groups * nsub * 2 * 1024);
    if (!mem) return -1;
    uint16_t *panel = (uint16_t *)mem;
    float *sums = (float *)(mem + panel_bytes);  /* [group][32 columns][even, odd][16][16] */
    tiles_config();
    for (int64_t r0 = 0; r0 < n; r0 += BT_ROWS) {
        const int64_t nr = n - r0 < BT_ROWS ? n - r0 : BT_ROWS;  /* a multiple of 32 */
        for (int sb = 0; sb < nsub; sb++)
            nf4_decode_pairs(packed, sc, code16, bs, k, r0, (int)(nr / 2), c0 + 32 * sb, panel + sb * sub_elems,
                             panel + sb * sub_elems + sub_elems / 2);
        for (int sb = 0; sb < nsub; sb++) {
            const uint16_t *even = panel + sb * sub_elems, *odd = even + sub_elems / 2;
            for (int gi = 0; gi < groups; gi += 2) {
                const int two = gi + 1 < groups;
                float *s0 = sums + ((int64_t)gi * nsub + sb) * 512, *s1 = s0 + nsub * 512;
                if (r0 == 0) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                } else {
                    _tile_loadd(0, s0, 64); _tile_loadd(1, s0 + 256, 64);
                    if (two) { _tile_loadd(2, s1, 64); _tile_loadd(3, s1 + 256, 64); }
                }
                const uint16_t *a0 = g + (int64_t)gi * 16 * n + r0, *a1 = a0 + 16 * n;
                for (int64_t s = 0; s < nr / 32; s++) {
                    _tile_loadd(4, a0 + 32 * s, n * 2);
                    _tile_loadd(6, even + s * 512, 64);
                    _tile_loadd(7, odd + s * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    if (two) {
                        _tile_loadd(5, a1 + 32 * s, n * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, s0, 64); _tile_stored(1, s0 + 256, 64);
                if (two) { _tile_stored(2, s1, 64); _tile_stored(3, s1 + 256, 64); }
            }
        }
    }
    _tile_release();
    /* sums[group][sb][eo][i][j] is y[16 group + i][c0 + 32 sb + 2j + eo] */
    for (int gi = 0; gi < groups; gi++)
        for (int sb = 0; sb < nsub; sb++)
            for (int i = 0; i < 16 && gi * 16 + i < m; i++) {
                float *yr = y + (int64_t)(gi * 16 + i) * k + c0 + 32 * sb;
                const float *e = sums + ((int64_t)gi * nsub + sb) * 512 + i * 16, *o = e + 256;
                for (int j = 0; j < 16; j++) yr[2 * j] = e[j], yr[2 * j + 1] = o[j];
            }
    return 0;
}
#endif
