"""The Triton kernels themselves (CUDA and XPU; CPU tensors under ``TRITON_INTERPRET=1``).

Only imported where Triton is. ``triton_kernels`` launches them and picks the tiles.
Three kernels, each reading the bitsandbytes layout directly:

* ``gemv_kernel``: ``y = x @ W.T (+ b)`` for skinny ``x``; the weight is decoded in
  registers and never written out.
* ``dequantize_kernel``: ``w[i] = code[q[i]] * absmax[i // blocksize]``, float32 then cast.
* ``quantize_kernel``: whole blocks to (packed bytes, absmax), bitsandbytes' rules.

Loads are vectorised the way the layout allows: one byte load gives both nibbles (the
even element is the high one), one absmax load serves a whole sub-block of
``min(blocksize, BLOCK_K)`` elements, and double-quantized absmax is decoded in the
kernel (``absmax = dq_code[codes] * dq_scale[block // nested_bs] + offset``). Launch
them with ``enable_fp_fusion=False``: a fused multiply-add would round the absmax (and
so the weights) differently from the CPU reference, which rounds after each step.
"""

import triton
import triton.language as tl


@triton.jit
def _absmax(am_ptr, ncode_ptr, nscale_ptr, noff_ptr, blk, mask, DOUBLE: tl.constexpr, NESTED_BS: tl.constexpr):
    """float32 absmax of blocks ``blk`` (any shape), plain or double-quantized."""
    if DOUBLE:
        c = tl.load(am_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(nscale_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        # absmax = dq_code[c] * dq_scale[group] + offset (two roundings, no FMA)
        return tl.load(ncode_ptr + c, mask=mask, other=0.0) * s + tl.load(noff_ptr)
    return tl.load(am_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _cast(w, DT: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> DT, rounding to nearest even. The interpreter's own bf16 cast truncates,
    so there (SOFT_BF16) the rounding is done on the bits: exact for finite values."""
    if SOFT_BF16 and DT == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(DT)


@triton.heuristics({
    # one absmax per sub-block of SUB = min(blocksize, BLOCK_K) elements: NB sub-blocks of HB bytes
    "NB": lambda a: max(1, a["BLOCK_K"] // a["BLOCKSIZE"]),
    "HB": lambda a: min(a["BLOCK_K"], a["BLOCKSIZE"]) // 2,
})
@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, am_ptr, ncode_ptr, nscale_ptr, noff_ptr, code_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, stride_ys,
    BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NB: tl.constexpr, HB: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """Program (n tile, k split, m tile): ``y[rm, rn] = sum_k x[rm, k] * w[rn, k]``.

    Needs ``K % BLOCKSIZE == 0`` (blocks never straddle rows), so sub-block ``b`` of the
    tile at ``k0`` has absmax index ``(n*K + k0 + b*2*HB) // BLOCKSIZE``. With ``SPLIT > 1``
    each split writes float32 partial sums at ``y + split * stride_ys`` (summed after:
    deterministic, unlike atomics) and bias is left to the caller.
    """
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    sub = tl.arange(0, NB)
    j = tl.arange(0, HB)
    n_ok = rn < N
    row_bytes = rn.to(tl.int64) * (K // 2)
    row_elem = rn.to(tl.int64) * K
    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # even element index of every byte in the tile, as (NB, HB) and flat (BLOCK_K // 2,)
        ke = k0 + sub[:, None] * (2 * HB) + 2 * j[None, :]
        k_ok = ke < K
        mask3 = n_ok[:, None, None] & k_ok[None, :, :]
        byte = tl.load(packed_ptr + row_bytes[:, None, None] + (ke // 2)[None, :, :], mask=mask3, other=0).to(tl.int32)
        blk = (row_elem[:, None] + k0 + sub[None, :] * (2 * HB)) // BLOCKSIZE
        am = _absmax(am_ptr, ncode_ptr, nscale_ptr, noff_ptr, blk, n_ok[:, None] & ((k0 + sub * 2 * HB) < K)[None, :], DOUBLE, NESTED_BS)
        # w = code[q] * absmax in float32, rounded to x's dtype as dequantize(q).to(x.dtype) is
        w_hi = tl.reshape(tl.load(code_ptr + (byte >> 4)) * am[:, :, None], (BLOCK_N, NB * HB))
        w_lo = tl.reshape(tl.load(code_ptr + (byte & 15)) * am[:, :, None], (BLOCK_N, NB * HB))
        w_hi = _cast(w_hi, x_ptr.dtype.element_ty, SOFT_BF16)
        w_lo = _cast(w_lo, x_ptr.dtype.element_ty, SOFT_BF16)
        kf = tl.reshape(ke, (NB * HB,))
        x_mask = (rm[:, None] < M) & (kf[None, :] < K)
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + kf[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + kf[None, :] + 1, mask=x_mask, other=0.0)
        if USE_DOT:  # tensor cores; BLOCK_M >= 16
            if IEEE:  # float32 x (or the interpreter): full fp32 products, no TF32
                acc += tl.dot(x_even.to(tl.float32), tl.trans(w_hi.to(tl.float32)), input_precision="ieee")
                acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_lo.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x_even, tl.trans(w_hi))
                acc += tl.dot(x_odd, tl.trans(w_lo))
        else:  # a few rows: broadcast multiply and reduce over k, in float32
            prod = x_even.to(tl.float32)[:, None, :] * w_hi.to(tl.float32)[None, :, :]
            prod += x_odd.to(tl.float32)[:, None, :] * w_lo.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)
    out_mask = (rm[:, None] < M) & n_ok[None, :]
    out = y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out, _cast(acc, y_ptr.dtype.element_ty, SOFT_BF16), mask=out_mask)
    else:
        tl.store(out, acc, mask=out_mask)


@triton.jit
def dequantize_kernel(
    packed_ptr, am_ptr, ncode_ptr, nscale_ptr, noff_ptr, code_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BS: tl.constexpr, SUB: tl.constexpr, ROWS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """ROWS sub-blocks of SUB elements (SUB divides the blocksize, so one absmax each):
    bytes in, ``code[nibble] * absmax`` out, both nibbles of a byte written side by side."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, SUB // 2)
    first = row * SUB  # first element of each row
    byte_i = first[:, None] // 2 + j[None, :]
    byte = tl.load(packed_ptr + byte_i, mask=byte_i < (n + 1) // 2, other=0).to(tl.int32)
    am = _absmax(am_ptr, ncode_ptr, nscale_ptr, noff_ptr, first // BLOCKSIZE, first < n, DOUBLE, NESTED_BS)
    hi = tl.load(code_ptr + (byte >> 4)) * am[:, None]
    lo = tl.load(code_ptr + (byte & 15)) * am[:, None]
    w = tl.reshape(tl.join(hi, lo), (ROWS, SUB))  # element 2j (high nibble) then 2j + 1
    e = first[:, None] + tl.arange(0, SUB)[None, :]
    tl.store(out_ptr + e, _cast(w, out_ptr.dtype.element_ty, SOFT_BF16), mask=e < n)


@triton.jit
def quantize_kernel(
    x_ptr, thr_ptr, map_ptr, packed_ptr, am_ptr, n_blocks,
    BLOCKSIZE: tl.constexpr, HAS_MAP: tl.constexpr, ROWS: tl.constexpr,
):
    """ROWS whole blocks: ``absmax = max |x|``, ``s = clamp(x * (1 / absmax), -1, 1)``
    (correctly rounded reciprocal, as bitsandbytes), level = number of the 15 thresholds
    strictly below ``s`` (a tie goes to the lower level), two codes per byte."""
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = blk < n_blocks
    e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(x_ptr + e, mask=ok[:, None], other=0.0).to(tl.float32)
    # NaN would vanish in a max on some targets: make such a block's absmax NaN explicitly,
    # so the caller's finiteness check finds it
    bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0
    absmax = tl.where(bad, float("nan"), tl.max(tl.abs(x), axis=1))
    recip = tl.math.div_rn(1.0, tl.maximum(absmax, 1e-38))
    s = tl.minimum(tl.maximum(x * recip[:, None], -1.0), 1.0)
    level = tl.zeros((ROWS, BLOCKSIZE), dtype=tl.int32)
    for t in tl.static_range(15):
        level += (s > tl.load(thr_ptr + t)).to(tl.int32)
    if HAS_MAP:  # sorted level -> storage index (FP4's order)
        level = tl.load(map_ptr + level).to(tl.int32)
    even, odd = tl.split(tl.reshape(level, (ROWS, BLOCKSIZE // 2, 2)))
    b = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + b, ((even << 4) | odd).to(tl.uint8), mask=ok[:, None])
    tl.store(am_ptr + blk, absmax, mask=ok)
