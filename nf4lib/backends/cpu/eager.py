"""The CPU kernels' fallback when the native library is missing: the default kernels'
formulas, tuned for memory (outputs written in place a chunk at a time, so extra peak
memory is one chunk), two threads on large dequantizes, and quantize's row kernel fused
by torch.compile for large tensors. Same bytes and values as ``backends.default``.
"""

from __future__ import annotations

import torch

from ..default import encode_blocks, encode_tail
from ...core.checks import raise_not_finite
from ...core.encode import pair_table
from . import compiled
from .halves import run_halves
from .hugepages import empty_large

__all__ = ["quantize", "dequantize", "dequantize_blocks_into"]

# quantize works this many elements at a time, so temporaries stay small (its extra
# peak memory stays under the input's size).
_CHUNK = 1 << 20
# dequantize goes 256K elements at a time: its 1 MiB of float32 pairs stays in cache
# between the gather and the multiply (measured ~1.4x faster than 1M on 2 cores).
_DEQUANT_CHUNK = 1 << 18
# From this many elements, dequantize runs its two halves on two threads.
_SPLIT_MIN = 1 << 22
# Above this size the fused, compiled row kernel pays for its one-off compile.
_COMPILE_MIN = 1 << 21

_fused_rows = compiled.compiled(encode_blocks)


def quantize(x: torch.Tensor, blocksize: int, thresholds: torch.Tensor, storage) -> tuple:
    """(packed, absmax) of the 1-D tensor ``x``, written chunk by chunk into the outputs."""
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    full = n - n % blocksize
    if full:
        rows = x[:full].view(-1, blocksize)
        fused = n >= _COMPILE_MIN and compiled.enabled()
        kernel = _fused_rows if fused else encode_blocks
        step = max(1, (2 * _CHUNK if fused else _CHUNK) // blocksize)
        for s in range(0, rows.shape[0], step):
            p, a = kernel(rows[s : s + step], thresholds, storage)
            packed[s * blocksize // 2 : s * blocksize // 2 + p.numel()].copy_(p)
            absmax[s : s + a.numel()].copy_(a)
    if n > full:
        p, a = encode_tail(x[full:], thresholds, storage)
        packed[full // 2 :].copy_(p)
        absmax[full // blocksize :].copy_(a)
    # A NaN or Inf anywhere makes its block's absmax NaN or Inf: check the small vector.
    if not bool(torch.isfinite(absmax).all()):
        raise_not_finite(x, blocksize)
    return packed, absmax


def dequantize_blocks_into(out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table, blocksize: int) -> None:
    """Write whole blocks: ``out`` (n,) any float dtype, n a multiple of blocksize.

    One 8-byte gather per byte into the pair table, then ``w = pair * absmax`` computed in
    float32 and written straight into ``out``'s dtype (the same rounding as a cast after).
    """
    index = packed.reshape(-1).int()
    if out.dtype == torch.float32:
        # the pairs land straight in the output and are scaled in place: one pass fewer
        torch.index_select(table, 0, index, out=out.view(torch.int64))
        out.view(-1, blocksize).mul_(absmax[:, None])
        return
    pairs = table.index_select(0, index)
    torch.mul(pairs.view(torch.float32).view(-1, blocksize), absmax[:, None], out=out.view(-1, blocksize))


def dequantize(q, dtype) -> torch.Tensor:
    """Whole blocks a chunk at a time (two threads on large tensors), then the partial last block."""
    n, bs, packed = q.numel, q.blocksize, q.packed
    absmax = q.scales.dequantize()
    out = empty_large(n, dtype, packed.device)
    table = pair_table(q.code.float())
    full = n - n % bs
    step = max(1, _DEQUANT_CHUNK // bs) * bs

    def blocks(lo, hi):
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            dequantize_blocks_into(out[s:e], packed[s // 2 : e // 2], absmax[s // bs : e // bs], table, bs)

    if full >= _SPLIT_MIN and torch.get_num_threads() > 1:
        run_halves(blocks, 0, full, bs)  # two cores on the (serial) gathers
    else:
        blocks(0, full)
    if full < n:
        pairs = table.index_select(0, packed[full // 2 :].int()).view(torch.float32)[: n - full]
        torch.mul(pairs, absmax[-1], out=out[full:])
    return out.view(q.shape)
