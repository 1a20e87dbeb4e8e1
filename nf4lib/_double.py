"""Layer 2: double quantization of the absmax vector (QLoRA section 3).

The float32 absmax of every 4-bit block is itself quantized to 8 bits with
bitsandbytes' signed dynamic map, in groups of 256, after subtracting its mean:

    ``absmax[i] ~= code8[codes[i]] * scales[i // 256] + offset``

That takes the absmax cost from 32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127 bits
per parameter at blocksize 64.
"""

from __future__ import annotations

import functools

import torch

from ._records import DoubleQuantized

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


def dynamic_map() -> torch.Tensor:
    """The 256-entry signed 8-bit dynamic map used for double quantization, float32, sorted."""
    return _dynamic_map_cached().clone()


def _nearest_sorted(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code``; a tie goes to the lower index.

    Distances are float32 ``|x - code[i]|``, as bitsandbytes' kernel computes them.
    """
    left = (torch.bucketize(x, code, right=True) - 1).clamp(0, code.numel() - 1)
    right = (left + 1).clamp(max=code.numel() - 1)
    go_right = (x - code[right]).abs() < (x - code[left]).abs()
    return torch.where(go_right, right, left)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> DoubleQuantized:
    """Quantize a float32 absmax vector to 8 bits (bitsandbytes ``compress_statistics``).

    Args:
        absmax: float32 ``(n_blocks,)``, non-negative.
        blocksize: codes per float32 scale; bitsandbytes uses 256.

    Returns:
        A :class:`DoubleQuantized` record; ``double_dequantize`` inverts it.

    Example:
        >>> dq = double_quantize(torch.rand(1024))
        >>> dq.codes.dtype, dq.scales.shape
        (torch.uint8, torch.Size([4]))
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"absmax must be a 1-D float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize!r}")
    code = _dynamic_map_cached().to(absmax.device)
    n = absmax.numel()
    if n == 0:
        empty = absmax.new_empty(0)
        return DoubleQuantized(empty.to(torch.uint8), empty, absmax.new_zeros(()), code, blocksize)
    offset = absmax.mean()
    centred = absmax - offset
    pad = (-n) % blocksize
    groups = torch.nn.functional.pad(centred, (0, pad)).view(-1, blocksize)
    scales = groups.abs().amax(dim=1)
    # bitsandbytes divides here (the 4-bit path multiplies by a reciprocal). A group
    # whose values all equal the mean has scale 0: it is stored as code 0.0.
    normed = torch.where(scales[:, None] > 0, groups / scales[:, None], 0.0).reshape(-1)[:n]
    codes = _nearest_sorted(normed, code).to(torch.uint8)
    return DoubleQuantized(codes, scales, offset, code, blocksize)


def dequantize_parts(codes, scales, offset, code, blocksize: int) -> torch.Tensor:
    """float32 absmax from the double-quant parts: ``code[codes] * scales[group] + offset``.

    Takes the tensors loose so the ``quantized_linear`` op, whose schema carries them
    separately, shares this one formula with :func:`double_dequantize`.
    """
    n = codes.numel()
    pad = (-n) % blocksize
    values = code[codes.long()]
    scaled = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * scales[:, None]
    return scaled.reshape(-1)[:n] + offset


def double_dequantize(dq: DoubleQuantized) -> torch.Tensor:
    """float32 absmax from a :class:`DoubleQuantized`: ``code[codes] * scales[group] + offset``."""
    return dequantize_parts(dq.codes, dq.scales, dq.offset, dq.code, dq.blocksize)
