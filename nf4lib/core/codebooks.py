"""Codebooks. Pure data; scipy is imported lazily, on first use.

A codebook is a 1-D float32 tensor of at most 16 levels in [-1, 1]. A 4-bit code
``q`` stands for the value ``code[q] * absmax[block]``. Codebooks are stored in
*storage order* (the order whose index is written into the nibble); for NF4, INT4
and user codebooks that order is sorted, for bitsandbytes' FP4 it is not.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .checks import transforms_active

__all__ = [
    "nf4_levels",
    "normal_float_levels",
    "fp4_levels",
    "int4_levels",
    "resolve_code",
    "CODE_NAMES",
]

CODE_NAMES = ("nf4", "fp4", "int4")


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace, written out so the rounding is ours and documented.

    The first half steps up from ``start``, the second half steps down from
    ``end``; for the step counts NF4 uses (9 and 8) this equals
    ``torch.linspace`` in float32 bit for bit, which is what the QLoRA
    construction (and so bitsandbytes' table) was computed with.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float32)
    return np.where(
        np.arange(steps) < steps // 2,
        start32 + step * i,
        end32 - step * (np.float32(steps - 1) - i),
    ).astype(np.float32)


def _qlora_offset(bits: int) -> float:
    # QLoRA (Dettmers et al. 2023, appendix E): the outermost quantile is the mean
    # of 1 - 1/(2*(2^k - 1)) and 1 - 1/(2*2^k), so the +-1 levels are not at
    # +-infinity. For k = 4 this rounds to the published 0.9677083.
    n = 2**bits
    return round(1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n)), 7)


@functools.lru_cache(maxsize=None)
def _normal_float_np(bits: int, symmetric: bool) -> np.ndarray:
    from scipy.stats import norm  # lazy: scipy is heavy to import

    if symmetric:
        # textbook k-bit quantiles: q_i = Phi^-1((2i + 1) / 2^(k+1)), no exact zero
        n = 2**bits
        p = (2 * np.arange(n) + 1) / 2 ** (bits + 1)
        levels = norm.ppf(p).astype(np.float32)
        return levels / np.abs(levels).max()
    # QLoRA asymmetric construction: 2^(k-1) positive quantiles, 2^(k-1) - 1
    # negative ones and one exact zero, so that zero (padding, pruned weights)
    # is represented exactly.
    half = 2 ** (bits - 1)
    offset = _qlora_offset(bits)
    pos = norm.ppf(_linspace_f32(offset, 0.5, half + 1)[:-1])
    neg = -norm.ppf(_linspace_f32(offset, 0.5, half)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]).astype(np.float32))
    return levels / levels.max()


def normal_float_levels(bits: int = 4, symmetric: bool = False) -> torch.Tensor:
    """k-bit NormalFloat levels, sorted, in [-1, 1].

    Args:
        bits: 2..8.
        symmetric: False gives the QLoRA construction (one exact zero, one more
            positive level than negative); True gives the textbook quantiles
            ``Phi^-1((2i+1)/2^(k+1))`` normalised to [-1, 1] (no zero).

    Returns:
        float32 tensor of shape ``(2**bits,)``.

    Example:
        >>> normal_float_levels(3)[3]  # the exact zero of NF3
        tensor(0.)
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    return torch.from_numpy(_normal_float_np(bits, bool(symmetric)).copy())


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels of QLoRA, float32, sorted; equal to bitsandbytes' table bit for bit.

    Example:
        >>> nf4_levels()[7], nf4_levels()[15]
        (tensor(0.), tensor(1.))
    """
    return normal_float_levels(4)


# bitsandbytes' FP4 (E2M1 variant) in its code order: index = sign bit * 8 + 3-bit
# magnitude code, magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12. Index 8 (sign bit set,
# magnitude 0) is stored as +0.0, as bitsandbytes stores it: the map's bits are the format.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def fp4_levels() -> torch.Tensor:
    """bitsandbytes' FP4 values in its code order (not sorted), float32, shape (16,)."""
    mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32, device="cpu") / 12.0
    return torch.cat([mags, 0.0 - mags])  # 0 - 0 is +0.0 (a negation would give -0.0)


def int4_levels() -> torch.Tensor:
    """Symmetric absmax INT4: k/7 for k = -7..7, float32, shape (15,)."""
    return torch.arange(-7, 8, dtype=torch.float32, device="cpu") / 7.0


def _check_user_code(code: torch.Tensor) -> torch.Tensor:
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be 'nf4', 'fp4', 'int4' or a tensor, got {type(code).__name__}")
    if not code.is_floating_point():
        raise TypeError(f"a codebook must be a floating point tensor, got dtype {code.dtype}")
    if code.dim() != 1 or not 1 <= code.numel() <= 16:
        raise ValueError(f"a codebook must be 1-D with 1..16 levels, got shape {tuple(code.shape)}")
    c = code.detach().to("cpu", torch.float32)
    if not torch.isfinite(c).all() or c.abs().max() > 1:
        raise ValueError(f"codebook levels must lie in [-1, 1], got {c.tolist()}")
    if c.numel() > 1 and not (c[1:] >= c[:-1]).all():
        raise ValueError(f"a codebook must be sorted ascending, got {c.tolist()}")
    return c.clone()


def resolve_code(code) -> torch.Tensor:
    """Turn ``"nf4" | "fp4" | "int4" | tensor`` into a float32 CPU codebook (storage order)."""
    if isinstance(code, str):
        name = code.lower()
        if name == "nf4":
            return nf4_levels()
        if name == "fp4":
            return fp4_levels()
        if name == "int4":
            return int4_levels()
        raise ValueError(f"unknown code {code!r}; expected one of {CODE_NAMES} or a tensor")
    return _check_user_code(code)


def code_name(code: torch.Tensor) -> str | None:
    """The name of a built-in codebook equal to ``code``, else None."""
    c = code.detach().to("cpu", torch.float32)
    for name, fn in (("nf4", nf4_levels), ("fp4", fp4_levels), ("int4", int4_levels)):
        ref = fn()
        if c.shape == ref.shape and torch.equal(c, ref):
            return name
    return None


def build_search_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds (15,) float32, sorted-to-storage index map (16,) int64) for ``code``.

    Pure tensor ops, so it also runs inside torch.compile and vmap.
    """
    code = code.to(torch.float32)
    # Stable sort: equal levels (FP4's +0 and -0) keep storage order, as bitsandbytes' argsort does.
    order = torch.argsort(code, stable=True)
    s = code[order]
    # Decision thresholds are float32 midpoints; a value exactly on one goes to the
    # lower level (torch.bucketize, right=False), as bitsandbytes does.
    mids = (s[1:] + s[:-1]) / 2
    # Pad to 15 thresholds with +inf so every codebook shares one kernel shape.
    pad = torch.full((15 - mids.numel(),), float("inf"), device=code.device)
    fill = torch.zeros(16 - order.numel(), dtype=torch.long, device=code.device)
    return torch.cat([mids, pad]), torch.cat([order, fill])


@torch.compiler.assume_constant_result
def named_code(name: str) -> torch.Tensor:
    """A built-in codebook by name; a constant to torch.compile."""
    return resolve_code(name)


@torch.compiler.assume_constant_result
def named_thresholds(name: str) -> torch.Tensor:
    return build_search_tables(resolve_code(name))[0]


@torch.compiler.assume_constant_result
def named_to_storage(name: str) -> torch.Tensor:
    return build_search_tables(resolve_code(name))[1]


def code_tables(code):
    """(levels in storage order, thresholds, sorted index -> storage index, identity) of a
    codebook given by name or as a tensor; ``identity`` says storage order is sorted order
    (every codebook but FP4), so the kernels may skip the index map.

    Under torch.compile or a torch.func transform a user's tensor is used unvalidated
    (validation reads its values), and the index map is always applied: right for any order.
    """
    if isinstance(code, str):  # the cached tables: constants to torch.compile
        name = code.lower()
        if name not in CODE_NAMES:
            raise ValueError(f"unknown code {code!r}; expected one of {CODE_NAMES} or a tensor")
        return named_code(name), named_thresholds(name), named_to_storage(name), name != "fp4"
    if transforms_active():
        levels = code.detach().to(torch.float32)
        return (levels, *build_search_tables(levels), False)
    levels = resolve_code(code)  # validated: sorted, so storage order is sorted order
    return (levels, *build_search_tables(levels), True)
