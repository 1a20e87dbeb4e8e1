"""Triton kernels for CUDA and XPU (one family: Triton targets both): ``quantized_linear``,
``dequantize`` and ``quantize``. The kernels are in ``jit``; this module launches
them and picks the route:

* up to ``FUSED_MAX_ROWS`` rows of ``x`` (decoding): the fused GEMV, autotuned over a small
  config set keyed on (N, K, rows), split over K when there are too few output tiles to
  fill the device;
* more rows (training, prefill): Triton dequantize to x's dtype, then ``F.linear``
  (cuBLAS), as bitsandbytes does; backward (``grad @ W``) takes the same route through
  ``dequantize`` and nothing of the weight's full size is kept between the two.

Shapes the GEMV cannot take (``in_features`` not a multiple of the blocksize, so blocks
straddle rows) take dequantize + matmul too. Without Triton, everything falls back to
the pure-PyTorch kernels. On CPU tensors under ``TRITON_INTERPRET=1`` the same kernels
run in numpy, with one fixed config (no autotuning), as CI tests them.

The tile sizes, ``FUSED_MAX_ROWS`` and the split rule are first guesses: none has been
measured on a GPU yet (see the README).
"""

import functools
import os

import torch

from ...core.checks import raise_not_finite
from ...core.records import QuantizedTensor
from ...ops.library import register_kernel
from .. import default
from ..default import encode_tail

try:
    import triton

    from . import jit

    HAVE_TRITON = True
except ImportError:  # Triton is optional: the fallbacks below are used instead
    HAVE_TRITON = False

# rows of x up to which the fused GEMV serves; above, dequantize + cuBLAS
FUSED_MAX_ROWS = 16
# quantize: blocksizes up to this many elements fit one kernel row; larger ones use torch
_QUANT_MAX_BLOCK = 4096
_DEQUANT_ELEMS = 4096  # elements per dequantize program


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(pairs):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in pairs]


def _fits(configs, named_args, **kwargs):
    """Drop broadcast-path configs whose (rows, n, k/2) product tile would spill registers."""
    if kwargs.get("USE_DOT"):
        return configs
    rows = kwargs.get("BLOCK_M", 1)
    kept = [c for c in configs if rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // 2 <= 4096 * c.num_warps]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _gemv(use_dot: bool):
    """The GEMV launcher: the raw kernel under the interpreter, autotuned on a device."""
    if interpreting():
        return jit.gemv_kernel, {"BLOCK_N": 16, "BLOCK_K": 128}
    if use_dot:  # tl.dot wants tiles of at least 16 in every dimension
        pairs = [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]
    else:
        pairs = [(8, 256, 4, 2), (16, 128, 4, 3), (16, 256, 4, 2), (32, 128, 4, 2), (32, 256, 8, 2), (16, 512, 8, 2), (64, 128, 8, 2)]
    tuned = triton.autotune(_configs(pairs), key=["N", "K", "BLOCK_M", "SPLIT", "BLOCKSIZE"], prune_configs_by={"early_config_prune": _fits})
    return tuned(jit.gemv_kernel), {}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "xpu":
        return getattr(torch.xpu.get_device_properties(device), "gpu_subslice_count", 64)
    return 1


def _split_k(n: int, k: int, device) -> int:
    """Splits over K so that about two waves of 32-row tiles fill the device, keeping at
    least 1024 elements of K per split."""
    if interpreting():
        return 1
    tiles = -(-n // 32)
    want = 2 * _sm_count(device)
    split = 1
    while split < 8 and tiles * split < want and k // (2 * split) >= 1024:
        split *= 2
    return split


def _scale_args(q: QuantizedTensor):
    """(am_ptr, ncode, nscale, noff, DOUBLE, NESTED_BS) for the kernels."""
    if q.double_quant:
        a = q.absmax
        return a.codes, a.code.float().contiguous(), a.scales, a.offset.reshape(1), True, a.blocksize
    am = q.absmax
    return am, am, am, am, False, 1


def _code16(q: QuantizedTensor) -> torch.Tensor:
    code = q.code
    if code.numel() == 16 and code.dtype == torch.float32 and code.is_contiguous():
        return code
    out = torch.zeros(16, dtype=torch.float32, device=code.device)
    out[: code.numel()] = code.float()
    return out


def gemv_ok(q: QuantizedTensor) -> bool:
    out_f, in_f = q.shape
    return in_f % q.blocksize == 0 and out_f * in_f > 0


def linear(x, q, bias):
    """The CUDA and XPU kernel of ``quantized_linear`` (CPU tensors under the interpreter)."""
    out_f, in_f = q.shape
    m = x.numel() // in_f if in_f else 0
    if not HAVE_TRITON or x.numel() == 0 or m > FUSED_MAX_ROWS or not gemv_ok(q):
        return default.linear(x, q, bias)  # dequantize (Triton, below) + F.linear
    return fused_linear(x, q, bias)


def fused_linear(x, q, bias, *, split=None):
    """The fused GEMV for any number of rows (``linear`` routes only skinny x here)."""
    out_f, in_f = q.shape
    x2 = x.reshape(-1, in_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    result = torch.empty(*x.shape[:-1], out_f, dtype=x.dtype, device=x.device)  # returned: not a view
    y = result.view(m, out_f)
    block_m = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 16
    use_dot = block_m >= 16
    split = _split_k(out_f, in_f, x.device) if split is None else split
    kernel, fixed = _gemv(use_dot)
    target = y if split == 1 else torch.empty(split, m, out_f, dtype=torch.float32, device=x.device)
    am, ncode, nscale, noff, double, nbs = _scale_args(q)
    b = bias if bias is not None else y  # a dummy pointer when there is no bias

    def grid(meta):
        return (triton.cdiv(out_f, meta["BLOCK_N"]), split, triton.cdiv(m, block_m))

    kernel[grid](
        x2, q.packed, am, ncode, nscale, noff, _code16(q), b, target,
        m, out_f, in_f, x2.stride(0), out_f, m * out_f,
        BLOCKSIZE=q.blocksize, DOUBLE=double, NESTED_BS=nbs, HAS_BIAS=bias is not None, SPLIT=split,
        BLOCK_M=block_m, USE_DOT=use_dot,
        # float32 x keeps fp32 accuracy (no TF32); the interpreter's numpy dot has no bf16
        IEEE=x.dtype == torch.float32 or x.device.type == "cpu",
        SOFT_BF16=interpreting(), enable_fp_fusion=False, **fixed,
    )
    if split > 1:
        total = target.sum(0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
    return result


def dequantize(q: QuantizedTensor, dtype: torch.dtype):
    """``w = code[q] * absmax`` in float32, cast to ``dtype``: the values of the CPU reference,
    bit for bit. None when Triton is missing (the caller then uses PyTorch)."""
    if not HAVE_TRITON or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    n = q.numel
    out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    if n == 0:
        return out
    sub = min(q.blocksize, 1024)
    rows = max(1, _DEQUANT_ELEMS // sub)
    am, ncode, nscale, noff, double, nbs = _scale_args(q)
    grid = (triton.cdiv(n, sub * rows),)
    jit.dequantize_kernel[grid](
        q.packed, am, ncode, nscale, noff, _code16(q), out, n,
        BLOCKSIZE=q.blocksize, DOUBLE=double, NESTED_BS=nbs, SUB=sub, ROWS=rows,
        SOFT_BF16=interpreting(), enable_fp_fusion=False,
    )
    return out


def quantize_into(flat, blocksize, thresholds, storage, packed, absmax) -> bool:
    """Fill ``packed`` and ``absmax`` for contiguous ``flat``: whole blocks in Triton, a
    partial last block in PyTorch (bitsandbytes divides there). False when Triton or the
    blocksize does not allow it; non-finite input shows as a non-finite absmax."""
    if not HAVE_TRITON or blocksize > _QUANT_MAX_BLOCK:
        return False
    n = flat.numel()
    full_blocks = n // blocksize
    if full_blocks:
        rows = max(1, 2048 // blocksize)
        thr = thresholds.float().contiguous()
        mapping = storage.to(torch.int32) if storage is not None else thr
        jit.quantize_kernel[(triton.cdiv(full_blocks, rows),)](
            flat, thr, mapping, packed, absmax, full_blocks,
            BLOCKSIZE=blocksize, HAS_MAP=storage is not None, ROWS=rows,
        )
    full = full_blocks * blocksize
    if full < n:
        p, a = encode_tail(flat[full:], thresholds, storage)
        packed[full // 2 :].copy_(p)
        absmax[full_blocks:].copy_(a)
    return True


def quantize(x, blocksize, code, thresholds, to_storage, scale, weights):
    """The quantize kernel: Triton for absmax scales, the default kernel otherwise."""
    n = x.numel()
    if scale == "absmax" and n:
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
        if quantize_into(x.contiguous(), blocksize, thresholds, to_storage, packed, absmax):
            if not bool(torch.isfinite(absmax).all()):  # non-finite input shows in its block's absmax
                raise_not_finite(x, blocksize)
            return packed, absmax
    return default.quantize(x, blocksize, code, thresholds, to_storage, scale, weights)


def dequantize_or_default(q: QuantizedTensor, dtype: torch.dtype):
    """The dequantize kernel: Triton where it runs, the default kernel otherwise."""
    out = dequantize(q, dtype)
    return default.dequantize(q, dtype) if out is None else out


def register(device_type: str) -> None:
    """Register the Triton kernel family for ``device_type`` (``"cuda"``, ``"xpu"``)."""
    register_kernel("quantize", device_type)(quantize)
    register_kernel("dequantize", device_type)(dequantize_or_default)
    register_kernel("quantized_linear", device_type)(linear)
    register_kernel("quantized_linear_grad", device_type)(default.linear_grad)  # Triton dequantize + cuBLAS
