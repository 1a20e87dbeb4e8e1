"""Double quantization of the absmax vector (QLoRA section 3).

The float32 absmax of every 4-bit block is itself quantized to 8 bits with
bitsandbytes' signed dynamic map, in groups of 256, after subtracting its mean:

    ``absmax[i] ~= code8[codes[i]] * scales[i // 256] + offset``

That takes the absmax cost from 32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127 bits
per parameter at blocksize 64.
"""

from __future__ import annotations

import functools

import torch

from .records import DoubleQuantized

__all__ = ["dynamic_map", "double_quantize", "double_dequantize"]


@functools.lru_cache(maxsize=1)
def _dynamic_map_cached() -> torch.Tensor:
    # Dettmers et al. 2022 ("8-bit optimizers via block-wise quantization"), signed
    # dynamic tree map with 7 exponent steps: for decade e = 10^(i-6), i = 0..6,
    # 2^i linearly spaced fractions in [0.1, 1] (their midpoints), with both signs,
    # plus 0 and 1: 127 + 127 + 2 = 256 values.
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32, device="cpu")
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (mids * (10.0 ** (i - 6))).tolist()
        values += (mids * -(10.0 ** (i - 6))).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device="cpu")


@torch.compiler.assume_constant_result  # a constant to torch.compile (its construction uses .tolist())
def _dynamic_map_constant() -> torch.Tensor:
    return _dynamic_map_cached()


def dynamic_map() -> torch.Tensor:
    """The 256-entry signed 8-bit dynamic map used for double quantization, float32, sorted."""
    return _dynamic_map_cached().clone()


# bitsandbytes 0.50's CPU kernel, the format of record here, does not search the map
# for each value. It builds a 65,536-entry table once, over the grid points
#     p_j = (j + j) / 65535 - 1,      j = 0 .. 65535          (float32 ops)
# holding for each p_j the number of map midpoints (code[k] + code[k+1]) * 0.5 below it,
# i.e. the nearest code, ties low. A value then goes through the grid:
#     v = clamp(x * (1 / scale), -1, 1),  j = trunc(fl32((v + 1) * 0.5 * 65535 + 0.5))
# (the last step one fused multiply-add). So a value gets the code nearest a point at most
# half a grid step (1/65535 ~ 1.5e-5 of the group's scale) away from it, not always the
# code nearest the value itself. We take the same steps so the codes, and so the
# checkpoints, match bit for bit (read off the shipped binary's disassembly: its
# build_quantize_lut and quantize_cpu_impl).
_GRID_STEPS = 65535


@functools.lru_cache(maxsize=1)
def _grid_table_cached() -> torch.Tensor:
    code = _dynamic_map_constant()
    midpoints = (code[:-1] + code[1:]) * 0.5
    j = torch.arange(_GRID_STEPS + 1, dtype=torch.float32, device="cpu")
    points = (j + j) / torch.tensor(float(_GRID_STEPS)) - 1.0
    return torch.searchsorted(midpoints, points, side="left").to(torch.uint8)


def _grid_codes(groups: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """8-bit codes of ``groups`` (float32 ``(g, blocksize)``) by bitsandbytes' grid table."""
    v = (groups * (1.0 / scales)[:, None]).clamp(-1.0, 1.0)
    # An all-zero group gives 0 * inf = NaN; the kernel's float->int conversion turns
    # NaN into index 0, so such a group is stored as code 0 (it dequantizes to the offset).
    v = torch.where(v.isnan(), -1.0, v)
    t = (v + 1.0) * 0.5
    # v + 1 is a multiple of 2^-24 on [0, 2], so T = t * 2^25 is an exact integer and the
    # fused t * 65535 + 0.5 equals (T * 65535 + 2^24) / 2^25 exactly. Converting that
    # int64 to float32 rounds once, to nearest even, as the FMA does; no float64 needed,
    # so this runs on devices without it.
    exact = (t * 2.0**25).to(torch.int64) * _GRID_STEPS + 2**24
    j = (exact.to(torch.float32) * 2.0**-25).to(torch.int64)
    return table[j]


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> DoubleQuantized:
    """Quantize a float32 absmax vector to 8 bits (bitsandbytes ``compress_statistics``).

    Codes, scales and offset equal bitsandbytes 0.50 bit for bit: each value takes the
    map entry nearest its point on bitsandbytes' 65,536-step grid over [-1, 1], which is
    the true nearest entry except within half a grid step (1.5e-5 of the group's scale)
    of a boundary between two entries.

    Args:
        absmax: float32 ``(n_blocks,)``, non-negative.
        blocksize: codes per float32 scale, a power of two in [2, 65536]; bitsandbytes uses 256.

    Returns:
        A :class:`DoubleQuantized` record; ``double_dequantize`` inverts it.

    Example:
        >>> dq = double_quantize(torch.rand(1024))
        >>> dq.codes.dtype, dq.scales.shape
        (torch.uint8, torch.Size([4]))
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"absmax must be a 1-D float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 2 <= blocksize <= 65536 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [2, 65536], got {blocksize!r}")
    # Each record owns its map: an in-place write to one layer's map must not reach another.
    code = _dynamic_map_constant().to(absmax.device, copy=True)
    table = _grid_table_cached().to(absmax.device)
    n = absmax.numel()
    if n == 0:
        empty = absmax.new_empty(0)
        return DoubleQuantized(empty.to(torch.uint8), empty, absmax.new_zeros(()), code, blocksize)
    offset = absmax.mean()
    centred = absmax - offset
    pad = (-n) % blocksize
    groups = torch.nn.functional.pad(centred, (0, pad)).view(-1, blocksize)
    scales = groups.abs().amax(dim=1)
    codes = _grid_codes(groups, scales, table).reshape(-1)
    if pad:  # own exactly n codes: no padding bytes behind the view to be saved with it
        codes = codes[:n].clone()
    return DoubleQuantized(codes, scales, offset, code, blocksize)


def double_dequantize(dq: DoubleQuantized) -> torch.Tensor:
    """float32 absmax from a :class:`DoubleQuantized`: ``code[codes] * scales[group] + offset``."""
    if not isinstance(dq, DoubleQuantized):
        raise TypeError(f"double_dequantize expects a DoubleQuantized, got {type(dq).__name__}")
    return dq.dequantize()
