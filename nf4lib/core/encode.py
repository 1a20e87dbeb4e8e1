"""The encoding rule, written once: every quantizer (absmax, MSE-searched scales, learned
scales, every device's reference) maps values to codes with these functions.

For a block with scale ``s``:

    ``u = v * (1 / s)``                      (float32 reciprocal, as bitsandbytes)
    ``q = #{t : t < clamp(u, -1, 1)}``       (sorted level index; ``t`` the 15 midpoints)
    ``code = to_storage[q]``                 (stored index; the identity but for FP4)

so a value exactly on a midpoint goes to the lower level, as bitsandbytes rounds. Codes
are packed two per byte, the even element in the high nibble; an odd tail is padded with
the code of 0.0, as bitsandbytes pads.
"""

from __future__ import annotations

import torch

__all__ = ["scaled", "levels_below", "nearest_levels", "pack", "sorted_levels", "pair_table"]


def scaled(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Blocks ``v`` (B, L) times their scales' float32 reciprocals ``1 / s`` (B,)."""
    return v * (1.0 / s.clamp(min=1e-38))[:, None]


def levels_below(u: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """int32 ``#{t : t < u}`` over the 15 (+inf padded) thresholds. Written as 15
    compare-adds rather than ``bucketize`` so inductor fuses it into one loop; eagerly the
    two are about as fast."""
    q = (u > thresholds[0]).to(torch.int32)
    for k in range(1, 15):
        q = q + (u > thresholds[k]).to(torch.int32)
    return q


def nearest_levels(u: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Sorted index of the level nearest each scaled value ``u``, clamped to [-1, 1] first."""
    return levels_below(u.clamp(-1.0, 1.0), thresholds)


def pack(levels: torch.Tensor, thresholds: torch.Tensor, to_storage: torch.Tensor | None) -> torch.Tensor:
    """Sorted level indices (n,) -> uint8 ((n + 1) // 2,): stored codes, two per byte.

    ``to_storage`` maps sorted index -> stored index; None when they agree (the gather
    costs ~2x)."""
    q = levels.reshape(-1).to(torch.int32)
    if q.numel() % 2:  # pad with the level of 0.0 (a tensor op: compile and vmap trace it)
        zero = levels_below(torch.zeros(1, device=q.device), thresholds)
        q = torch.cat([q, zero])
    if to_storage is not None:
        q = to_storage[q.long()].to(torch.int32)
    q = q.reshape(-1, 2)
    return ((q[:, 0] << 4) | q[:, 1]).to(torch.uint8)


def sorted_levels(levels: torch.Tensor, to_storage: torch.Tensor) -> torch.Tensor:
    """float32 (16,): the codebook's values in sorted order (zero-padded), from ``levels``
    in storage order and ``to_storage`` (sorted index -> storage index)."""
    k = levels.numel()
    out = torch.zeros(16, dtype=torch.float32, device=levels.device)
    out[:k] = levels.float()[to_storage[:k].to(levels.device)]
    return out


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64 whose 8 bytes are the float32 pair (code[b >> 4], code[b & 15]): one
    gather decodes a byte."""
    c = torch.zeros(16, dtype=torch.float32, device=code.device)
    c[: code.numel()] = code
    return torch.stack([c.repeat_interleave(16), c.repeat(16)], dim=1).contiguous().view(torch.int64).view(-1)
