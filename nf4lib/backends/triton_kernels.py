"""Triton kernels for ``nf4lib::quantized_linear``: one family for NVIDIA (CUDA) and Intel
(XPU) GPUs, since Triton targets both. Fused: the 4-bit weight is decoded in registers,

    ``w[n, k] = code[nibble(n*K + k)] * absmax[(n*K + k) // blocksize]``,

rounded to x's dtype (as ``dequantize(q).to(x.dtype)`` would), and multiplied at once.
A GEMV kernel serves small batches (decode), a ``tl.dot`` kernel the rest. Without
Triton, ``forward`` falls back to the default kernel (dequantize + matmul).
Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``), as CI does.
"""

import torch

from . import default

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # Triton is optional: the fallback below is used instead
    HAVE_TRITON = False

# batches up to this many rows take the GEMV kernel
GEMV_MAX_ROWS = 8

if HAVE_TRITON:

    @triton.jit
    def _decode(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE: tl.constexpr):
        """(BLOCK_N, BLOCK_K) float32 weight tile: code[nibble] * absmax[block]."""
        idx = rn[:, None].to(tl.int64) * K + rk[None, :]
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)  # even element: high nibble
        level = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        scale = tl.load(absmax_ptr + idx // BLOCKSIZE, mask=mask, other=0.0)
        return level * scale

    @triton.jit
    def _gemv_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr, N, K, stride_xm, stride_ym,
        BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        m = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0)
            w = _decode(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE)
            w = w.to(x.dtype).to(tl.float32)  # the weight as dequantize(q).to(x.dtype) has it
            acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)

    @triton.jit
    def _matmul_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
        BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = _decode(packed_ptr, absmax_ptr, code_ptr, rn, rk, N, K, BLOCKSIZE).to(x.dtype)
            if UPCAST:  # exact bf16 values, multiplied in fp32 (see forward)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:  # fp32 inputs: no TF32 shortcut, to keep fp32 accuracy
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear(x, q, bias):
    """The CUDA and XPU kernel (also callable on CPU tensors under the Triton interpreter)."""
    if not HAVE_TRITON or x.numel() == 0:
        return default.linear(x, q, bias)
    out_f, in_f = q.shape
    packed, code, bs = q.packed, q.code, q.blocksize
    am = q.scales.dequantize().float().contiguous()
    x2 = x.reshape(-1, in_f).contiguous()
    m = x2.shape[0]
    code16 = torch.zeros(16, dtype=torch.float32, device=x.device)
    code16[: code.numel()] = code.float()
    result = torch.empty(*x.shape[:-1], out_f, dtype=x.dtype, device=x.device)  # returned: not a view
    y = result.view(m, out_f)
    b = bias.contiguous() if bias is not None else y  # y is a dummy pointer when there is no bias
    if m <= GEMV_MAX_ROWS:
        block_n, block_k = 32, 128
        grid = (m, triton.cdiv(out_f, block_n))
        _gemv_kernel[grid](
            x2, packed, am, code16, b, y, out_f, in_f, x2.stride(0), y.stride(0),
            BLOCKSIZE=bs, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    else:
        block_m, block_n, block_k = 32, 64, 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(out_f, block_n))
        _matmul_kernel[grid](
            x2, packed, am, code16, b, y, m, out_f, in_f, x2.stride(0), y.stride(0),
            BLOCKSIZE=bs, HAS_BIAS=bias is not None,
            # The Triton interpreter (CPU tensors) computes tl.dot in numpy, which has no
            # bf16: there the bf16 tiles are widened to fp32 first (same values).
            UPCAST=x.dtype == torch.bfloat16 and x.device.type == "cpu",
            IEEE=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu"),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return result
