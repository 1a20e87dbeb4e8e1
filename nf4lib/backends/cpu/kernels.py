"""CPU kernel of ``nf4lib::quantized_linear``.

With the native library (``nf4lib.backends.cpu.native``):

* batches up to :func:`gemv_max_rows` rows: the fused decode-dot GEMV; the weight is decoded
  in registers and never written out, products summed in float32 (with the AMX kernels, bf16
  x from 3 rows: the GEMM on AMX tiles, the weight decoded into the core's cache);
* larger batches: decode a tile of rows at a time into one reused buffer (native,
  multithreaded) and multiply each tile as it is made, so the full-precision weight
  never exists at once and each tile is still in cache when the matmul reads it.

Without it, the same tiling with the eager decode (``eager.dequantize_blocks_into``).
"""

import functools
import math
import threading

import torch

from . import eager, native as _native
from .. import default
from ...core import mse
from ...core.checks import FLOAT_DTYPES, raise_not_finite
from ...core.encode import pair_table, sorted_levels
from ...ops.library import register_kernel

# ~1M weight elements per tile: big enough for an efficient fp32 matmul, small enough for L2/L3.
_TILE_ELEMS = 1 << 20
# bf16 GEMMs (oneDNN, AVX512-BF16) want taller tiles: on a 2-core AVX512-BF16 EPYC, 5504x2048
# at batch 128 took 15.9 ms in 512-row tiles, 9.9 ms in 2048-row ones (whole weight: 9.4 ms).
# On a 2-core Xeon with AMX, 256 rows of x, weights cold (medians of interleaved rounds):
# 4096x4096 in 2^20/2^22/2^24-element tiles 10.7/8.2/8.9 ms, 11008x4096 26.4/19.3/21.7 ms.
_TILE_ELEMS_HALF = 1 << 22
# The fused GEMV re-reads the 4-bit weight once per 8 rows of x. On 4096x4096 bf16 (2-core
# AVX2, medians) it beat tile decode + matmul up to 24 rows (16 rows: 14.5 vs 16.3 ms) and
# lost at 32 (32.5 vs 28.8 ms).
GEMV_MAX_ROWS = 16
# Where the CPU multiplies bf16 natively (AVX512-BF16, AMX), a tile decode + bf16 GEMM is the
# faster one from 8 rows (2-core Xeon with AMX, bf16, medians: 4096x4096 at 8 rows 2.1 ms
# tiles vs 2.4 GEMV, at 16 rows 2.0 vs 4.6; 2048x2048 at 8 rows 0.53 vs 0.59).
GEMV_MAX_ROWS_NATIVE_HALF = 6
# With the AMX kernels (``native.isa() == "amx"``), bf16 x with in_features % 32 == 0 and
# blocksize >= 32 takes the native GEMM on AMX tiles (from 3 rows; the AVX512-BF16 GEMV
# below), which decodes each weight into the core's cache instead of writing a tile out, up to
# this many rows (the range measured). 2-core Xeon, bf16, weights cold, medians in ms, AMX
# GEMM / tiles + oneDNN / dense bf16: 4096x4096 at 8 rows 1.5 / 4.4 / 2.1, at 128 4.2 / 7.0 /
# 4.6, at 256 7.2 / 9.6 / 6.1, at 1024 26.3 / 28.1 / 18.3, at 2048 64.6 / 72.4 / 34.5;
# 11008x4096 at 256 15.7 / 20.7 / 15.2.
AMX_GEMM_MAX_ROWS = 2048


def gemv_max_rows(dtype: torch.dtype, in_f: int = 0, blocksize: int = 0) -> int:
    """The most rows of x the native GEMV/GEMM takes for activations of ``dtype`` (and a
    weight with ``in_f`` columns and ``blocksize``) on this CPU; above, tiles + torch.mm."""
    if not native_half_gemm(dtype):
        return GEMV_MAX_ROWS
    if dtype == torch.bfloat16 and in_f % 32 == 0 and blocksize >= 32 and _native.isa() == "amx":
        return AMX_GEMM_MAX_ROWS
    return GEMV_MAX_ROWS_NATIVE_HALF


@functools.lru_cache(maxsize=None)
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (bf16: AVX512-BF16 or AMX;
    fp16: AMX-FP16), asked of the CPU rather than assumed. Measured on a 2-core AVX512-BF16
    EPYC, 256x4096 @ 4096x4096: bf16 22 ms, fp32 75 ms; without such instructions a
    half-precision GEMM is several times slower than fp32."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return False


def _compute_dtype(x: torch.Tensor, m: int) -> torch.dtype:
    # Above a few rows, a half-precision x is multiplied in its own dtype where the CPU has
    # native instructions for it, else in fp32 (faster there, and the more accurate choice).
    if x.dtype == torch.float32 or (m >= 8 and not native_half_gemm(x.dtype)):
        return torch.float32
    return x.dtype


def _fresh(y: torch.Tensor, x: torch.Tensor, out_f: int) -> torch.Tensor:
    # a fresh tensor, not a view of one: FSDP2 (and in-place ops after it) treat views specially
    out = torch.empty(*x.shape[:-1], out_f, dtype=x.dtype, device=x.device)
    out.view(-1, out_f).copy_(y)
    return out


def native_usable(q, *others, in_kernel: bool = True) -> bool:
    """True when the native kernels can take the validated record ``q`` (and the tensors
    ``others``, None allowed): see ``native.usable``."""
    a = q.absmax
    parts = (a.codes, a.scales, a.offset, a.code) if q.double_quant else (a,)
    return _native.usable(q.packed, q.code, *parts, *others, in_kernel=in_kernel)


def gemv_plan(q):
    """The native GEMV's prepared arguments for a validated 2-D record (a frozen weight
    caches them), or None where the native kernels cannot take it."""
    if q.numel == 0 or not native_usable(q, in_kernel=False):
        return None
    return _native.GemvPlan(q)


_PLANNED_DTYPES = frozenset(FLOAT_DTYPES)


def planned_linear_fits(x, plan, bias) -> bool:
    """Whether :func:`planned_linear` serves these arguments (this runs on every small call:
    each check is one attribute read)."""
    in_f = plan.in_f
    if not x.is_cpu or x.dtype not in _PLANNED_DTYPES or x.dim() == 0 or x.shape[-1] != in_f or not _native.active():
        return False
    if not 0 < x.numel() <= gemv_max_rows(x.dtype, in_f, plan.bs) * in_f:
        return False
    return bias is None or (bias.is_cpu and bias.dim() == 1 and bias.shape[0] == plan.out_f and bias.dtype in _PLANNED_DTYPES)


def planned_linear(x, plan, bias, *, float32: bool = False, checked: bool = False):
    """``x @ W.T + bias`` through a prepared GEMV, recording no gradient: the op's CPU
    kernel without the per-call work a frozen weight need not repeat (its record, checks and
    native arguments). None where the op must run instead (other shapes, dtypes, devices,
    more than :func:`gemv_max_rows` rows). ``float32``: return the float32 sums (else x's
    dtype); ``checked``: :func:`planned_linear_fits` already said yes."""
    if not checked and not planned_linear_fits(x, plan, bias):
        return None
    y = torch.empty(*x.shape[:-1], plan.out_f, dtype=torch.float32)  # a fresh tensor, not a view
    _native.planned_gemv(plan, x if x.dim() == 2 else x.reshape(-1, plan.in_f), x.dtype, bias, y)
    return y if float32 or x.dtype == torch.float32 else y.to(x.dtype)


@register_kernel("quantize", "cpu")
def quantize(x, blocksize, code, thresholds, to_storage, scale, weights):
    if not _native.usable(x, weights, in_kernel=True):
        if scale == "mse":
            return default.quantize(x, blocksize, code, thresholds, to_storage, scale, weights)
        return eager.quantize(x, blocksize, thresholds, to_storage)
    n = x.numel()
    x = x.contiguous()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if scale == "mse":
        storage = torch.arange(16) if to_storage is None else to_storage
        ok = n == 0 or _native.quantize_mse_into(x, blocksize, thresholds, sorted_levels(code, storage), storage, weights,
                                                  mse.RATIOS, mse.STEPS, packed, absmax)
    else:
        ok = _native.quantize_into(x, blocksize, thresholds, to_storage, packed, absmax)
    if not ok:
        raise_not_finite(x, blocksize)
    return packed, absmax


@register_kernel("dequantize", "cpu")
def dequantize(q, dtype):
    if dtype in FLOAT_DTYPES and native_usable(q):
        out = eager.empty_large(q.numel, dtype, q.packed.device)
        _native.decode_into(out, q)
        return out.view(q.shape)
    return eager.dequantize(q, dtype)


_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A tile buffer of ``n`` elements, reused across calls on this thread: a fresh
    multi-megabyte buffer each call costs its page faults (zeroing each page) on every
    call, about as long as decoding into it."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        # never an inference tensor (one made under torch.inference_mode could not be written
        # by the next call outside it)
        with torch.inference_mode(False):
            buf = bufs[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _tiles(q, dtype: torch.dtype, native: bool):
    """(r0, r1, W[r0:r1] in ``dtype``) over the weight's rows, a tile at a time, decoded into
    one reused buffer (each tile is still in cache when the matmul reads it, and the
    full-precision weight never exists at once)."""
    out_f, in_f = q.shape
    bs = q.blocksize
    unit = bs // math.gcd(in_f, bs)  # rows per tile: a multiple of the rows that make whole blocks
    tile_elems = _TILE_ELEMS if dtype == torch.float32 else _TILE_ELEMS_HALF
    rows = max(unit, (tile_elems // in_f) // unit * unit)
    buf = _scratch(min(rows, out_f) * in_f, dtype)
    if not native:
        am, table = q.scales.dequantize(), pair_table(q.code.float())
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        e0, e1 = r0 * in_f, r1 * in_f
        tile = buf[: e1 - e0]
        if native:
            _native.decode_into(tile, q, e0, e1, cached=True)
        else:
            eager.dequantize_blocks_into(tile, q.packed[e0 // 2 : e1 // 2], am[e0 // bs : e1 // bs], table, bs)
        yield r0, r1, tile.view(r1 - r0, in_f)


@register_kernel("quantized_linear", "cpu")
def linear(x, q, bias):
    out_f, in_f = q.shape
    n, bs = q.numel, q.blocksize
    if n == 0 or x.numel() == 0:
        return default.linear(x, q, bias)
    native = x.dtype in (torch.float32, torch.bfloat16, torch.float16) and native_usable(q, x, bias, in_kernel=True)
    if not native and n % bs:  # a partial block straddles rows: use the reference
        return default.linear(x, q, bias)
    x2 = x.reshape(-1, in_f)
    m = x2.shape[0]
    if native and m <= gemv_max_rows(x.dtype, in_f, bs):
        # y = x @ W.T + b, each weight as dequantize(q).to(x.dtype) has it
        return _fresh(_native.gemv(x2, q, x.dtype, bias), x, out_f)
    dtype = _compute_dtype(x, m)
    xc = x2.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # a fresh tensor, not a view of one: FSDP2 (and in-place ops after it) treat views specially
    out = torch.empty(*x.shape[:-1], out_f, dtype=x.dtype, device=x.device)
    y = out.view(m, out_f)
    for r0, r1, tile in _tiles(q, dtype, native):
        # y[:, r0:r1] = (W[r0:r1] @ x.T + b[r0:r1]).T, rounded to x's dtype once: oneDNN runs
        # the tall weight tile as the left factor faster than x @ W.T (256x4096 @ 4096x4096
        # bf16, AMX: 4.1 vs 5.3 ms), and the tile's transpose is copied while in cache
        part = torch.mm(tile, xc.t())
        if b is not None:
            part.add_(b[r0:r1, None])
        y[:, r0:r1].copy_(part.t())
    return out


@register_kernel("quantized_linear_grad", "cpu")
def linear_grad(grad, q):
    """``dL/dx = dL/dy @ W``: bf16 grad on the native AMX GEMM where the CPU has it and the
    shape fits (``native.input_grad_bf16``); otherwise tile by tile, ``sum over row tiles of
    grad[:, rows] @ W[rows]``, accumulated in float32. The tiles are multiplied in grad's dtype
    where the CPU has fast instructions for it, else in float32: without them a bf16 matmul
    runs ~100x slower (8x4096 @ 4096x4096 on a 2-core AVX2 EPYC: ~950 ms in bf16)."""
    out_f, in_f = q.shape
    n, bs = q.numel, q.blocksize
    if n == 0 or grad.numel() == 0:
        return default.linear_grad(grad, q)
    native = grad.dtype in FLOAT_DTYPES and native_usable(q, grad)
    if not native and n % bs:  # a partial block straddles rows: use the reference
        return default.linear_grad(grad, q)
    if native and grad.dtype == torch.bfloat16 and grad.numel() // out_f <= AMX_GEMM_MAX_ROWS:
        # the AMX tiles where the CPU has them (None elsewhere): each weight decoded once into
        # the core's cache, float32 sums over all of out_features
        y = _native.input_grad_bf16(grad.reshape(-1, out_f), q)
        if y is not None:
            return y.to(grad.dtype).view(*grad.shape[:-1], in_f)
    dtype = grad.dtype if grad.dtype == torch.float32 or native_half_gemm(grad.dtype) else torch.float32
    g2 = grad.reshape(-1, out_f).to(dtype)
    acc = None
    for r0, r1, tile in _tiles(q, dtype, native):
        part = g2[:, r0:r1] @ tile
        acc = part.float() if acc is None else acc.add_(part)
    return acc.to(grad.dtype).view(*grad.shape[:-1], in_f)
