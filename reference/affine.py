"""Affine (asymmetric) group-wise INT4 in plain numpy, written to be read: the oracle for the
``int4-affine`` baseline (torchao's float zero-point domain, the layout its int4 weight-only
path stores).

Per group of ``g`` consecutive float32 weights, with bf16 storage of the two parameters::

    scale = bf16(max(max - min) / 15, tiny))     zero = bf16(min + 8 * scale32)
    lo    = bf16(zero - 8 * scale)                 # the group's lowest level, in bf16 arithmetic
    q     = clip(round_half_even((w - lo) / scale), 0, 15)
    w_hat = (q - 8) * scale + zero                 # float32, multiply then add
"""

import numpy as np

F32 = np.float32


def bf16(x):
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(F32)


def affine_int4(x, g):
    """Quantize and dequantize ``x`` (any shape) in groups of ``g`` consecutive elements
    (a last partial group padded with copies of its last element). Returns float32, x's shape."""
    x = np.asarray(x, dtype=F32)
    flat = x.ravel()
    n = flat.size
    groups = -(-n // g)
    flat = np.concatenate([flat, np.full(groups * g - n, flat[-1], dtype=F32)])
    out = np.empty_like(flat)
    tiny = np.finfo(F32).tiny  # torchao clamps the scale at the input dtype's smallest normal
    for i in range(groups):
        w = flat[i * g : (i + 1) * g]
        lo32, hi32 = w.min(), w.max()
        scale32 = max(F32(F32(hi32 - lo32) / F32(15)), F32(tiny))
        scale = bf16(scale32)
        zero = bf16(F32(lo32 + F32(scale32 * F32(8))))
        lo = bf16(F32(zero - F32(scale * F32(8))))
        q = np.clip(np.round(((w - lo) / scale).astype(F32)), 0, 15)
        out[i * g : (i + 1) * g] = F32((q - 8).astype(F32) * scale) + zero
    return out[:n].reshape(x.shape)
