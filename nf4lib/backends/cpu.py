"""CPU kernel: dequantize the weight a tile of rows at a time into one reused buffer and
multiply each tile as it is made, so the full-precision weight never exists at once and
each tile is still in cache when the matmul reads it."""

import math

import torch

from .._ops import register_kernel
from .._quant import dequantize_blocks_into, pair_table
from . import default

# ~1M weight elements per tile: big enough for an efficient matmul, small enough for L2/L3.
_TILE_ELEMS = 1 << 20


def _compute_dtype(x: torch.Tensor, m: int) -> torch.dtype:
    # CPUs without native bf16/fp16 matmul run half-precision GEMMs far slower than fp32;
    # above a few rows it pays to dequantize to fp32 (also the more accurate choice).
    if x.dtype == torch.float32 or (m >= 8 and torch.backends.cpu.get_cpu_capability() != "AMX"):
        return torch.float32
    return x.dtype


@register_kernel("cpu")
def linear(x, q, bias):
    out_f, in_f = q.shape
    n, bs = q.numel, q.blocksize
    if n % bs or n == 0 or x.numel() == 0:  # a partial block straddles rows: use the reference
        return default.linear(x, q, bias)
    am = q.scales.dequantize()
    packed = q.packed
    x2 = x.reshape(-1, in_f)
    m = x2.shape[0]
    dtype = _compute_dtype(x, m)
    xc = x2.to(dtype)
    # rows per tile: a multiple of the rows that make whole blocks
    unit = bs // math.gcd(in_f, bs)
    rows = max(unit, (_TILE_ELEMS // in_f) // unit * unit)
    table = pair_table(q.code.float())
    buf = torch.empty(min(rows, out_f) * in_f, dtype=dtype, device=x.device)
    out_t = torch.empty(out_f, m, dtype=dtype, device=x.device)  # y.T: each tile fills whole rows
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        e0, e1 = r0 * in_f, r1 * in_f
        tile = buf[: e1 - e0]
        dequantize_blocks_into(tile, packed[e0 // 2 : e1 // 2], am[e0 // bs : e1 // bs], table, bs)
        torch.mm(tile.view(r1 - r0, in_f), xc.t(), out=out_t[r0:r1])  # y.T[r0:r1] = W[r0:r1] @ x.T
    y = out_t.t()
    if bias is not None:
        y = y + bias.to(dtype)
    # a fresh tensor, not a view of one: FSDP2 (and in-place ops after it) treat views specially
    out = torch.empty(*x.shape[:-1], out_f, dtype=x.dtype, device=x.device)
    out.view(m, out_f).copy_(y)
    return out
