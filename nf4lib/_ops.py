"""Layer 3: the ``nf4lib::quantized_linear`` op, defined once: schema, fake kernel,
autograd formula and vmap rule. Device kernels live in ``nf4lib/backends/``.

    ``y = x @ dequantize(W).T + bias``, ``W ~= code[q] * absmax[block]``

The weight travels as its stored parts (packed codes, absmax or its double-quantized
parts, the codebook), so nothing of the weight's full size exists outside a kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._double import dequantize_parts
from ._records import DoubleQuantized, QuantizedTensor

__all__ = ["quantized_linear"]


@torch.library.custom_op("nf4lib::quantized_linear", mutates_args=())
def _quantized_linear_op(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    out_features: int,
    in_features: int,
    blocksize: int,
    bias: Optional[Tensor],
    dq_scales: Optional[Tensor],
    dq_offset: Optional[Tensor],
    dq_code: Optional[Tensor],
    dq_blocksize: int,
) -> Tensor:
    """``y = x @ W.T + bias``. With ``dq_scales`` given, ``absmax`` holds uint8 double-quant
    codes and ``absmax_f32 = dq_code[absmax] * dq_scales[i // dq_blocksize] + dq_offset``."""
    from .backends import default

    return default.forward(x, packed, absmax, code, out_features, in_features, blocksize, bias, dq_scales, dq_offset, dq_code, dq_blocksize)


@_quantized_linear_op.register_fake
def _(x, packed, absmax, code, out_features, in_features, blocksize, bias, dq_scales, dq_offset, dq_code, dq_blocksize):
    torch._check(x.is_floating_point(), lambda: f"x must be floating point, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(
        x.shape[-1] == in_features,
        lambda: f"x's last dim {x.shape[-1]} != in_features {in_features}",
    )
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    n = out_features * in_features
    torch._check(packed.numel() == (n + 1) // 2, lambda: f"packed has {packed.numel()} bytes, expected {(n + 1) // 2}")
    torch._check(absmax.numel() == -(-n // blocksize), lambda: f"absmax has {absmax.numel()} entries, expected {-(-n // blocksize)}")
    torch._check(code.dim() == 1 and code.numel() <= 16, lambda: "code must be 1-D with <= 16 levels")
    if dq_scales is None:
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    else:
        torch._check(absmax.dtype == torch.uint8, lambda: "double-quantized absmax codes must be uint8")
    if bias is not None:
        torch._check(bias.shape == (out_features,), lambda: f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    return x.new_empty((*x.shape[:-1], out_features))


def _absmax_f32(absmax, dq_scales, dq_offset, dq_code, dq_blocksize):
    if dq_scales is None:
        return absmax
    return dequantize_parts(absmax, dq_scales, dq_offset, dq_code, dq_blocksize)


def dequantized_weight(packed, absmax, code, out_features, in_features, blocksize, dq_scales, dq_offset, dq_code, dq_blocksize, dtype):
    """The full (out, in) weight in ``dtype``: used by the default kernel and by backward."""
    from ._quant import _dequantize_pure

    am = _absmax_f32(absmax, dq_scales, dq_offset, dq_code, dq_blocksize)
    n = out_features * in_features
    return _dequantize_pure(packed, am, code.float(), n, blocksize, dtype).view(out_features, in_features)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, code, out_f, in_f, bs, bias, dq_scales, dq_offset, dq_code, dq_bs = inputs
    # Only the stored 4-bit parts are saved: backward dequantizes again.
    ctx.save_for_backward(packed, absmax, code, dq_scales, dq_offset, dq_code)
    ctx.meta = (out_f, in_f, bs, dq_bs, x.dtype, bias is not None)


def _backward(ctx, grad):
    packed, absmax, code, dq_scales, dq_offset, dq_code = ctx.saved_tensors
    out_f, in_f, bs, dq_bs, x_dtype, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantized_weight(packed, absmax, code, out_f, in_f, bs, dq_scales, dq_offset, dq_code, dq_bs, grad.dtype)
        grad_x = (grad @ w).to(x_dtype)  # dL/dx = dL/dy @ W
    if has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None


_quantized_linear_op.register_autograd(_backward, setup_context=_setup_context)


@_quantized_linear_op.register_vmap
def _(info, in_dims, x, packed, absmax, code, out_f, in_f, bs, bias, dq_scales, dq_offset, dq_code, dq_bs):
    x_dim, *rest = in_dims
    if all(d is None for d in rest):
        # Only x is batched: a linear layer already maps over leading dims.
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
        out = _quantized_linear_op(x, packed, absmax, code, out_f, in_f, bs, bias, dq_scales, dq_offset, dq_code, dq_bs)
        return out, 0
    # A batched weight or bias: one call per batch element.
    args = [x, packed, absmax, code, bias, dq_scales, dq_offset, dq_code]
    # rest: packed, absmax, code, out_f, in_f, bs, bias, dq_scales, dq_offset, dq_code, dq_bs
    dims = [x_dim, rest[0], rest[1], rest[2], rest[6], rest[7], rest[8], rest[9]]
    outs = []
    for i in range(info.batch_size):
        a = [t if d is None or t is None else t.select(d, i) for t, d in zip(args, dims)]
        outs.append(_quantized_linear_op(a[0], a[1], a[2], a[3], out_f, in_f, bs, a[4], a[5], a[6], a[7], dq_bs))
    return torch.stack(outs), 0


def op_args(q: QuantizedTensor):
    """The op's weight arguments for a 2-D QuantizedTensor, in schema order after ``x``."""
    out_f, in_f = q.shape
    if isinstance(q.absmax, DoubleQuantized):
        d = q.absmax
        return q.packed, d.codes, q.code, out_f, in_f, q.blocksize, d.scales, d.offset, d.code, d.blocksize
    return q.packed, q.absmax, q.code, out_f, in_f, q.blocksize, None, None, None, 256


def quantized_linear(x: Tensor, q: QuantizedTensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, dequantize(q).to(x.dtype), bias)`` without materialising the weight.

    Args:
        x: float tensor ``(..., in_features)``; fp32, fp16 or bf16.
        q: a 2-D :class:`QuantizedTensor` of shape ``(out_features, in_features)``,
            plain or double-quantized, any blocksize and codebook.
        bias: optional ``(out_features,)``.

    Returns:
        ``(..., out_features)`` in ``x.dtype``. Differentiable in ``x`` and ``bias``;
        the 4-bit weight is frozen.

    Example:
        >>> q = nf4lib.quantize(torch.randn(256, 128))
        >>> nf4lib.quantized_linear(torch.randn(4, 128), q).shape
        torch.Size([4, 256])
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D weight (out_features, in_features), got shape {q.shape}")
    out_f, in_f = q.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension {tuple(x.shape)[-1:] or '()'} does not match in_features {in_f} of the weight {q.shape}")
    if x.device != q.packed.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {q.packed.device}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},) for out_features {out_f}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    packed, absmax, code, o, i, bs, dq_s, dq_o, dq_c, dq_bs = op_args(q)
    return _quantized_linear_op(x, packed, absmax, code, o, i, bs, bias, dq_s, dq_o, dq_c, dq_bs)
