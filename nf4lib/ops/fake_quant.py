"""NF4 fake quantization for quantization-aware training.

``fake_quantize(w)`` is ``dequantize(quantize(w))`` in the forward, with a gradient that
lets ``w`` keep learning through the rounding:

* ``ste="identity"``: the straight-through estimator, ``dL/dw = dL/dw_hat``;
* ``ste="clipped"``: the same inside the block's range and 0 where ``|w| > scale``
  (values the 4-bit grid clips; only a scale below absmax clips any).

With a learnable per-block ``scale`` tensor (LSQ, Esser et al. 2020, arXiv 1902.08153)
the forward is ``w_hat = code[q(w / s)] * s`` and the scale gets its own gradient,

    ``dw_hat/ds = c - w / s`` inside the range, ``c`` (the end level) outside,

scaled by ``1 / sqrt(blocksize)`` (LSQ's gradient scale, which keeps the scale's steps
in proportion to the weights'); ``w`` then gets the clipped STE. ``q`` is the nearest
level to ``w * (1 / s)``, the rule quantize uses, so a model finalised with these scales
computes exactly what training saw.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..core.codebooks import CODE_NAMES, code_tables
from ..core.encode import nearest_levels, pack, scaled, sorted_levels
from ..core.checks import check_blocksize, check_scale
from .quantize import dequantize, quantize
from ..core.records import QuantizedTensor

__all__ = ["fake_quantize", "encode_with_scales", "block_absmax"]

_STE = ("identity", "clipped")


def _padded_blocks(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 ``(n_blocks, blocksize)`` view of ``w``, the last block zero-padded."""
    flat = w.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def block_absmax(w: torch.Tensor, *args, blocksize: int = 64) -> torch.Tensor:
    """float32 ``(n_blocks,)`` absmax of each block of ``w`` (a learnable scale's start)."""
    if args:  # the old signature took blocksize positionally
        if len(args) > 1:
            raise TypeError("block_absmax takes one positional argument (the weight); pass blocksize= by keyword")
        warnings.warn("block_absmax: pass blocksize= by keyword; positional blocksize is deprecated and will be removed "
                      "in the next release", DeprecationWarning, stacklevel=2)
        blocksize = args[0]
    return _padded_blocks(w.detach(), check_blocksize(blocksize)).abs().amax(dim=1)


def _assign(v: torch.Tensor, s: torch.Tensor, thresholds, table):
    """(u = v / s unclamped, |u| <= 1, the nearest levels' values) of blocks ``v``."""
    u = scaled(v, s)
    return u, u.abs() <= 1.0, table.to(v.device)[nearest_levels(u, thresholds.to(v.device))]


class _FakeQuant(torch.autograd.Function):
    """Fixed scales (absmax or searched): STE to ``w``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w, w_hat, mask):
        # w_hat was computed outside (quantize + dequantize, no gradient); returned as a
        # new tensor so autograd sees an output of this function, not its input
        return w_hat.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return (grad if mask is None else grad * mask), None, None


class _LearnedScale(torch.autograd.Function):
    """LSQ: ``w_hat = c * s`` with gradients to ``w`` (clipped STE) and ``s``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w, s, thresholds, table, blocksize):
        v = _padded_blocks(w, blocksize)
        u, inside, c = _assign(v, s.float(), thresholds, table)
        out = (c * s.float()[:, None]).reshape(-1)[: w.numel()].view(w.shape).to(w.dtype)
        return out, u, inside, c

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, u, inside, c = output
        ctx.save_for_backward(u, inside, c)
        ctx.meta = (inputs[0].shape, inputs[0].dtype, inputs[1].dtype, inputs[4])
        ctx.mark_non_differentiable(u, inside, c)

    @staticmethod
    def backward(ctx, grad, *_):
        u, inside, c = ctx.saved_tensors
        shape, w_dtype, s_dtype, blocksize = ctx.meta
        g = _padded_blocks(grad, blocksize)
        grad_w = (g * inside).reshape(-1)[: math.prod(shape)].view(shape).to(w_dtype)
        # dw_hat/ds = c - u inside the range, c outside; LSQ's gradient scale 1/sqrt(blocksize)
        grad_s = (g * torch.where(inside, c - u, c)).sum(dim=1) / math.sqrt(blocksize)
        return grad_w, grad_s.to(s_dtype), None, None, None


def fake_quantize(
    w: torch.Tensor,
    *,
    blocksize: int = 64,
    code="nf4",
    scale="absmax",
    ste: str = "identity",
) -> torch.Tensor:
    """4-bit fake quantization: the values ``dequantize(quantize(w))`` would give, with
    gradients for training through them.

    Args:
        w: float tensor, any shape (fp32 / bf16 / fp16). Not modified.
        blocksize, code: as in :func:`nf4lib.quantize`.
        scale: ``"absmax"`` (default), ``"mse"`` (searched per block, as
            ``quantize(scale="mse")``; re-searched each call), or a float32 tensor of
            ``ceil(w.numel() / blocksize)`` learnable per-block scales (LSQ; start it
            from :func:`block_absmax`).
        ste: ``"identity"`` or ``"clipped"`` (zero gradient where ``|w| > scale``);
            a learnable scale always uses the clipped form.

    Returns:
        ``w_hat`` of ``w``'s shape and dtype; differentiable in ``w`` (and ``scale``).
        Works under autograd, ``torch.func`` (grad, vmap) and ``torch.compile``.

    Example:
        >>> w = torch.randn(64, 128, requires_grad=True)
        >>> fake_quantize(w).sum().backward()           # w.grad is all ones (STE)
        >>> s = torch.nn.Parameter(block_absmax(w))
        >>> fake_quantize(w, scale=s).pow(2).sum().backward()  # s.grad too
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"fake_quantize expects a floating point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    check_blocksize(blocksize)
    if ste not in _STE:
        raise ValueError(f"ste must be one of {_STE}, got {ste!r}")
    if isinstance(code, str) and code.lower() not in CODE_NAMES:
        raise ValueError(f"unknown code {code!r}; expected one of {CODE_NAMES} or a tensor")
    n_blocks = -(-w.numel() // blocksize)
    if isinstance(scale, torch.Tensor):
        if scale.shape != (n_blocks,):
            raise ValueError(f"a learnable scale must have shape ({n_blocks},) for {w.numel()} elements at blocksize {blocksize}, got {tuple(scale.shape)}")
        levels, thresholds, order, _ = code_tables(code)
        return _LearnedScale.apply(w, scale, thresholds, sorted_levels(levels, order), blocksize)[0]
    mode = check_scale(scale)
    q = quantize(w.detach(), blocksize=blocksize, code=code, scale=mode)
    w_hat = dequantize(q, w.dtype)
    mask: Optional[torch.Tensor] = None
    if ste == "clipped" and mode != "absmax":  # absmax clips nothing
        s = q.absmax
        v = _padded_blocks(w.detach(), blocksize)
        mask = (v.abs() <= s[:, None]).reshape(-1)[: w.numel()].view(w.shape).to(w.dtype)
    return _FakeQuant.apply(w, w_hat, mask)


def encode_with_scales(w: torch.Tensor, scales: torch.Tensor, *, blocksize: int = 64, code="nf4"):
    """The :class:`QuantizedTensor` of ``w`` with the given per-block ``scales`` stored as
    its absmax: codes = nearest level to ``w * (1 / scale)``. What a learned-scale QAT
    model finalises to; ``dequantize`` of it equals ``fake_quantize(w, scale=scales)``."""
    check_blocksize(blocksize)
    scales = scales.detach().float().contiguous()
    n = w.numel()
    if scales.shape != (-(-n // blocksize),):
        raise ValueError(f"scales must have shape ({-(-n // blocksize)},), got {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError("scales must be finite and non-negative")
    levels, thresholds, order, _ = code_tables(code)
    thresholds, order = thresholds.to(w.device), order.to(w.device)
    lv = nearest_levels(scaled(_padded_blocks(w.detach(), blocksize), scales), thresholds)
    packed = pack(lv.reshape(-1)[:n], thresholds, order)
    return QuantizedTensor(packed, scales.to(w.device), levels.to(w.device), tuple(w.shape), w.dtype, blocksize)
