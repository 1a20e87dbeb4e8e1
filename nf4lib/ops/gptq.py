"""GPTQ on the NF4 grid: calibrated 4-bit weights in bitsandbytes' layout.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023) quantizes a layer ``y = x W^T`` one input column at a time and moves
each column's rounding error onto the columns not yet quantized, so that the layer's output
error on its calibration inputs ``X`` stays small. With ``H = X^T X`` (damped) and ``U`` the
upper Cholesky factor of ``H^-1``:

    for column j:   q_j = Q(w_j)                     # nearest level times the block's scale
                    e_j = (w_j - q_j) / U[j, j]
                    w_k -= e_j * U[j, k]  for k > j    # the error, pushed onto later columns

Nothing needs a uniform grid. NF4 blocks are ``blocksize`` consecutive inputs of one row
(bitsandbytes' layout when rows are a multiple of it long); a block's scale (its absmax, or a
searched scale) is fixed when the block's first column is reached, from the block's values at
that moment, and each column is encoded exactly as :func:`nf4lib.quantize` encodes
(``u = w * (1/s)``, nearest level, ties down). The result is an ordinary
:class:`QuantizedTensor`: bitsandbytes and every reader of its 4-bit checkpoints read it.

With ``H = I`` no error moves and the result is round-to-nearest (:func:`nf4lib.quantize`),
bit for bit. Updates are applied lazily in batches of ``block_columns`` columns (the paper's
lazy batch); the propagation runs in float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.checks import check_float_input
from ..core.codebooks import code_tables
from ..core.double import double_quantize
from ..core.encode import pack, sorted_levels
from ..core.mse import search
from ..core.records import QuantizedTensor
from ..core.spec import QuantSpec, settings

__all__ = ["gptq_quantize", "input_hessian", "layer_output_error"]


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 for inputs ``x`` of shape ``(..., in_features)``: what
    :func:`gptq_quantize` weighs errors by. Sum it over batches (its scale does not matter)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"inputs must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    x = x.detach().reshape(-1, x.shape[-1]).double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"calibration inputs hold {int((~torch.isfinite(x)).sum())} NaN/Inf value(s)")
    return x.t() @ x


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, *,
                       dtype: torch.dtype = torch.float64) -> float:
    """``sum((X W^T - X W_hat^T)^2) = trace(E H E^T)`` with ``E = W - W_hat``, ``H = X^T X``:
    the squared output error on the inputs ``H`` was built from, without them. ``dtype``: of
    the product (float32 is twice as fast, for comparisons)."""
    e = (w.to(dtype) - w_hat.to(dtype))
    return float(((e @ hessian.to(dtype)) * e).sum(dtype=torch.float64))


def _check(w, hessian, spec, damp, block_columns, act_order):
    check_float_input(w, "gptq_quantize")
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if in_f % spec.blocksize:
        raise ValueError(f"gptq_quantize needs in_features ({in_f}) to be a multiple of blocksize ({spec.blocksize}) "
                         f"so that each block is one row's run of inputs; choose a blocksize dividing {in_f}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"gptq_quantize: the weight holds {int((~torch.isfinite(w)).sum())} NaN/Inf value(s)")
    if not isinstance(hessian, torch.Tensor) or not hessian.is_floating_point():
        raise TypeError(f"hessian must be a floating point tensor, got {getattr(hessian, 'dtype', type(hessian).__name__)}")
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian must be (in_features, in_features) = ({in_f}, {in_f}) for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds NaN/Inf values (were the calibration inputs finite?)")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of the Hessian's mean diagonal), got {damp!r}")
    if isinstance(block_columns, bool) or not isinstance(block_columns, int) or block_columns < 1:
        raise ValueError(f"block_columns must be a positive int, got {block_columns!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {act_order!r}")


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``), float64.

    With ``P`` the reversal permutation and ``P H P = M M^T`` (Cholesky), ``U = P M^-1 P``: one
    factorization and one triangular inverse, a third of inverting ``H`` and factorizing again."""
    h = h.double().clone()
    h = (h + h.t()) / 2
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # an input never seen: no error to weigh, none to move (its row and column are zero)
    diag += damp * float(diag.mean())
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); raise damp, or calibrate on "
                         f"more (and more varied) inputs")
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)


def _order(h: torch.Tensor, blocksize: int, act_order: bool) -> torch.Tensor:
    """Column order. ``act_order``: blocks by decreasing total ``diag H``, and within a block
    columns by decreasing ``diag H`` (blocks stay whole, so each keeps one scale)."""
    n = h.shape[0]
    if not act_order:
        return torch.arange(n)
    d = torch.diagonal(h).double().reshape(-1, blocksize)
    blocks = torch.argsort(d.sum(1), descending=True, stable=True)
    within = torch.argsort(d, dim=1, descending=True, stable=True)
    return (blocks[:, None] * blocksize + within[blocks]).reshape(-1)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, spec: Optional[QuantSpec] = None, blocksize: int = 64,
                  code="nf4", double_quant: bool = False, scale: str = "absmax", damp: float = 0.01,
                  act_order: bool = False, block_columns: int = 128) -> QuantizedTensor:
    """Quantize a layer's weight with GPTQ's error compensation on an NF4 (or any 4-bit) grid.

    Args:
        w: the weight, ``(out_features, in_features)``, float32 / float16 / bfloat16. Not modified.
        hessian: ``(in_features, in_features)``, ``X^T X`` of the layer's calibration inputs
            (:func:`input_hessian`); any positive multiple gives the same result.
        spec: the settings (:class:`~nf4lib.QuantSpec`), or the four keywords below.
        blocksize: inputs per block; must divide ``in_features``.
        code: the codebook (``"nf4"``, ``"fp4"``, ``"int4"`` or a tensor).
        double_quant: quantize the block scales to 8 bits afterwards (as :func:`nf4lib.quantize`).
        scale: ``"absmax"`` or ``"mse"`` (each block's scale searched when its first column is reached).
        damp: added to the Hessian's diagonal as a fraction of its mean (GPTQ's 1%); larger is closer
            to round-to-nearest and overfits the calibration data less.
        act_order: quantize the blocks with the largest input energy first (the paper's
            activation order, per block: each block keeps one scale).
        block_columns: columns per lazy update (rounded up to a multiple of ``blocksize``).

    Returns:
        A :class:`QuantizedTensor` of ``w``'s shape and dtype, in bitsandbytes' layout.

    Raises:
        ValueError: a Hessian of the wrong shape, NaN/Inf in ``w`` or the Hessian, a damped
            Hessian that is not positive definite, ``in_features`` not a multiple of ``blocksize``.

    Example:
        >>> h = input_hessian(x)                       # x: (tokens, 4096) inputs of the layer
        >>> q = gptq_quantize(layer.weight, h, blocksize=64)
        >>> nf4lib.dequantize(q)                       # lower error on x @ W.T than quantize(W)
    """
    spec = settings(spec, "gptq_quantize", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
    _check(w, hessian, spec, damp, block_columns, act_order)
    bs = spec.blocksize
    out_f, in_f = w.shape
    levels, thresholds, to_storage, identity = code_tables(spec.code)
    table = sorted_levels(levels, to_storage)
    bounds = thresholds.contiguous()
    perm = _order(hessian, bs, act_order)
    u = _inverse_factor(hessian[perm][:, perm], damp)
    work = w.detach().double()[:, perm].clone()  # in processing order
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    scales = torch.empty(out_f, in_f // bs, dtype=torch.float32)  # per (row, block), in processing order
    step = -(-block_columns // bs) * bs
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        w1 = work[:, i1:i2].clone()  # compact: the column updates below touch it 128 times
        err = torch.empty(out_f, i2 - i1, dtype=torch.float64)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % bs == 0:  # a block opens: its scale, from its values now
                v = w1[:, i : i + bs].float()
                if spec.scale == "mse":
                    _, s = search(v.reshape(-1), bs, levels, thresholds, to_storage, None)
                else:
                    s = v.abs().amax(1)
                scales[:, j // bs] = s
                inv = 1.0 / s.clamp(min=1e-38)  # the float32 reciprocal quantize multiplies by
            # nearest level, ties down: #{t : t < clamp(w * (1/s), -1, 1)} (core.encode's rule)
            q = ((w1[:, i].float() * inv).clamp_(-1.0, 1.0)[:, None] > bounds).sum(1)
            codes[:, j] = q
            # w ~= code[q] * absmax[block], in float32 as dequantize computes it
            e = (w1[:, i] - (table[q] * s).double()).div_(u1[i, i])
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1.0)
            err[:, i] = e
        work[:, i2:] -= err @ u[i1:i2, i2:]  # the batch's errors, pushed onto the columns after it
    inverse = torch.argsort(perm)
    codes = codes[:, inverse]
    block_perm = perm.reshape(-1, bs)[:, 0] // bs  # original block of each processed block
    absmax = torch.empty_like(scales)
    absmax[:, block_perm] = scales
    storage = None if identity else to_storage
    packed = pack(codes.reshape(-1), thresholds, storage)
    absmax = absmax.reshape(-1)
    stored = double_quantize(absmax) if spec.double_quant else absmax
    return QuantizedTensor(packed, stored, levels, tuple(w.shape), w.dtype, bs)
