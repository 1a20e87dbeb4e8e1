"""``quantized_linear``: ``y = x @ dequantize(W).T + bias`` without materialising ``W``,
``W ~= code[q] * absmax[block]``; the autograd formula and vmap rule of its op
(``nf4lib::quantized_linear``, defined in ``ops.library``), and the public function.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.checks import validate
from ..core.records import QuantizedTensor
from .library import check_linear_input, map_each, op_args

__all__ = ["quantized_linear", "linear_parts", "no_grad_needed", "input_grad"]

_op = torch.ops.nf4lib.quantized_linear.default
_grad_op = torch.ops.nf4lib.quantized_linear_grad.default
OP = "nf4lib::quantized_linear"


# ----------------------------------------------------------------------------- autograd
# The 4-bit weight is frozen: gradients flow to x and bias only.
#     dL/dx = dL/dy @ W        dL/dbias = sum of dL/dy over the leading dims
# Only the stored 4-bit parts are saved; backward decodes them again, so no full-size
# weight outlives the forward.


def _grads(ctx, grad, need_x: bool, need_bias: bool):
    """(dL/dx, dL/dbias) from the saved 4-bit parts; both autograd formulas below use it."""
    packed, absmax, quant_map, n_abs, n_map, n_off = ctx.saved_tensors
    out_f, in_f, bs, n_bs = ctx.meta
    grad_x = grad_bias = None
    if need_x:
        # dL/dx = dL/dy @ W: its own op, so each device computes it its own way (the CPU in
        # tiles, in float32 where it lacks fast half-precision matmuls)
        parts = (packed, absmax, quant_map, n_abs, n_map, n_off)
        if torch.compiler.is_compiling():
            grad_x = _grad_op(grad, packed, absmax, quant_map, out_f, in_f, bs, n_abs, n_map, n_off, n_bs)
        else:  # differentiable again under autograd and torch.func (double backward, jacrev of grad)
            grad_x = _LinearGrad.apply(grad, *parts, ctx.meta)
        grad_x = grad_x.to(ctx.x_dtype)
    if need_bias:
        grad_bias = grad.reshape(-1, out_f).sum(0)
    return grad_x, grad_bias


def _op_setup_context(ctx, inputs, output):
    x, packed, absmax, quant_map, out_f, in_f, bs, bias, n_abs, n_map, n_off, n_bs = inputs
    ctx.save_for_backward(packed, absmax, quant_map, n_abs, n_map, n_off)
    ctx.meta, ctx.x_dtype, ctx.has_bias = (out_f, in_f, bs, n_bs), x.dtype, bias is not None


def _op_backward(ctx, grad):
    # needs_input_grad may be shorter when trailing default arguments were dropped: ask
    # about bias only when there is one
    grad_x, grad_bias = _grads(ctx, grad, ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[7])
    return (grad_x,) + (None,) * 6 + (grad_bias,) + (None,) * 4


torch.library.register_autograd(OP, _op_backward, setup_context=_op_setup_context)


@torch.library.register_vmap(OP)
def _vmap(info, in_dims, x, packed, absmax, quant_map, out_f, in_f, bs=64, bias=None,
          n_abs=None, n_map=None, n_off=None, n_bs=None):
    # The dispatcher drops trailing arguments left at their defaults: pad their dims.
    x_dim, p_dim, a_dim, m_dim, _, _, _, b_dim, na_dim, nm_dim, no_dim, _ = tuple(in_dims) + (None,) * (12 - len(in_dims))
    if all(d is None for d in (p_dim, a_dim, m_dim, b_dim, na_dim, nm_dim, no_dim)):
        # Only x is batched: a linear layer already maps over leading dims.
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
        return _op(x, packed, absmax, quant_map, out_f, in_f, bs, bias, n_abs, n_map, n_off, n_bs), 0
    # A batched weight or bias: one call per batch element.
    return map_each(_op, info, in_dims, (x, packed, absmax, quant_map, out_f, in_f, bs, bias, n_abs, n_map, n_off, n_bs))


# dL/dx = g @ W is linear in g: its own gradient is gg @ W.T, the forward op again (so
# double backward, and torch.func's higher derivatives, work).
def _grad_setup_context(ctx, inputs, output):
    _, packed, absmax, quant_map, out_f, in_f, bs, n_abs, n_map, n_off, n_bs = inputs
    ctx.save_for_backward(packed, absmax, quant_map, n_abs, n_map, n_off)
    ctx.meta = (out_f, in_f, bs, n_bs)


def _grad_backward(ctx, gg):
    packed, absmax, quant_map, n_abs, n_map, n_off = ctx.saved_tensors
    out_f, in_f, bs, n_bs = ctx.meta
    return (_op(gg, packed, absmax, quant_map, out_f, in_f, bs, None, n_abs, n_map, n_off, n_bs),) + (None,) * 10


torch.library.register_autograd("nf4lib::quantized_linear_grad", _grad_backward, setup_context=_grad_setup_context)


@torch.library.register_vmap("nf4lib::quantized_linear_grad")
def _grad_vmap(info, in_dims, grad, packed, absmax, quant_map, out_f, in_f, bs=64, n_abs=None, n_map=None, n_off=None, n_bs=None):
    args = (grad, packed, absmax, quant_map, out_f, in_f, bs, n_abs, n_map, n_off, n_bs)
    dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    if all(d is None for d in dims[1:]):
        # only the gradient is batched: the op already maps over leading dims
        g_dim = dims[0]
        grad = grad.movedim(g_dim, 0) if g_dim is not None else grad.expand(info.batch_size, *grad.shape)
        return _grad_op(grad, *args[1:]), 0
    return map_each(_grad_op, info, in_dims, args)


class _Linear(torch.autograd.Function):
    """The op with an autograd formula that torch.func composes with (grad, vjp, jacrev,
    jvp, vmap of either): custom ops' own autograd does not compose with torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, bias, packed, absmax, quant_map, n_abs, n_map, n_off, meta):
        out_f, in_f, bs, n_bs = meta
        return _op(x, packed, absmax, quant_map, out_f, in_f, bs, bias, n_abs, n_map, n_off, n_bs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, packed, absmax, quant_map, n_abs, n_map, n_off, meta = inputs
        weight = (packed, absmax, quant_map, n_abs, n_map, n_off)
        ctx.save_for_backward(*weight)
        ctx.save_for_forward(*weight)  # forward mode multiplies by the same (constant) weight
        ctx.meta, ctx.x_dtype, ctx.has_bias = meta, x.dtype, bias is not None

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_bias = _grads(ctx, grad, ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[1])
        return grad_x, grad_bias, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, bias_t, *_):
        # y is linear in x and bias: dy = dx @ W.T + dbias (the weight's tangent is zero)
        packed, absmax, quant_map, n_abs, n_map, n_off = ctx.saved_tensors
        out_f, in_f, bs, n_bs = ctx.meta
        y_t = _op(x_t, packed, absmax, quant_map, out_f, in_f, bs, None, n_abs, n_map, n_off, n_bs)
        return y_t if bias_t is None else y_t + bias_t


class _LinearGrad(torch.autograd.Function):
    """``dL/dx = g @ W`` (the grad op) with an autograd formula torch.func composes with:
    linear in ``g``, so its gradient is ``gg @ W.T`` (the forward op) and its tangent
    ``g_t @ W``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, packed, absmax, quant_map, n_abs, n_map, n_off, meta):
        out_f, in_f, bs, n_bs = meta
        return _grad_op(grad, packed, absmax, quant_map, out_f, in_f, bs, n_abs, n_map, n_off, n_bs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight = inputs[1:7]
        ctx.save_for_backward(*weight)
        ctx.save_for_forward(*weight)
        ctx.meta = inputs[7]

    @staticmethod
    def backward(ctx, gg):
        weight = ctx.saved_tensors
        return (_Linear.apply(gg, None, *weight, ctx.meta),) + (None,) * 7

    @staticmethod
    def jvp(ctx, g_t, *_):
        packed, absmax, quant_map, n_abs, n_map, n_off = ctx.saved_tensors
        out_f, in_f, bs, n_bs = ctx.meta
        return _grad_op(g_t, packed, absmax, quant_map, out_f, in_f, bs, n_abs, n_map, n_off, n_bs)


def input_grad(grad: Tensor, parts: dict) -> Tensor:
    """``dL/dx = dL/dy @ W`` for a weight given as the op's named arguments, in grad's dtype;
    differentiable again (see :class:`_LinearGrad`)."""
    meta = (parts["out_features"], parts["in_features"], parts["blocksize"], parts.get("nested_blocksize"))
    return _LinearGrad.apply(grad, parts["packed"], parts["absmax"], parts["quant_map"], parts.get("nested_absmax"),
                             parts.get("nested_quant_map"), parts.get("nested_offset"), meta)


def no_grad_needed(x: Tensor, bias: Optional[Tensor]) -> bool:
    """True for a call that records nothing: plain tensors, no torch.func transform, and
    grad mode off or nothing requiring a gradient."""
    if type(x) is not Tensor or (bias is not None and type(bias) not in (Tensor, torch.nn.Parameter)):
        return False  # subclasses (DTensor, functorch wrappers) keep the full dispatch
    if torch._C._are_functorch_transforms_active():
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad))


def linear_parts(x: Tensor, parts: dict, bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T + bias`` for a weight given as the op's named arguments (see :func:`op_args`);
    differentiable in ``x`` and ``bias`` under autograd and torch.func."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an autograd.Function with a custom jvp; the op's own autograd
        # formula (the same one) serves compiled training.
        return _op(x, bias=bias, **parts)
    if no_grad_needed(x, bias):
        # Inference: nothing to record, so skip the autograd layers (torch's Python
        # autograd wrapper binds the op's signature on every call: ~200 us of a batch-1
        # CPU call that otherwise takes ~40 us for a small weight).
        with torch._C._AutoDispatchBelowAutograd():
            return _op(x, bias=bias, **parts)
    meta = (parts["out_features"], parts["in_features"], parts["blocksize"], parts.get("nested_blocksize"))
    return _Linear.apply(
        x, bias, parts["packed"], parts["absmax"], parts["quant_map"],
        parts.get("nested_absmax"), parts.get("nested_quant_map"), parts.get("nested_offset"), meta,
    )


def quantized_linear(x: Tensor, q: QuantizedTensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, dequantize(q).to(x.dtype), bias)`` without materialising the weight.

    Args:
        x: float tensor ``(..., in_features)``; fp32, fp16 or bf16.
        q: a 2-D :class:`QuantizedTensor` of shape ``(out_features, in_features)``,
            plain or double-quantized, any blocksize and codebook.
        bias: optional ``(out_features,)``.

    Returns:
        ``(..., out_features)`` in ``x.dtype``. Differentiable in ``x`` and ``bias``
        (autograd and ``torch.func``: grad, vjp, jvp, jacrev, vmap); the 4-bit weight
        is frozen.

    Raises:
        TypeError: ``x`` is not a floating point tensor (an integer or bool input would
            otherwise be silently truncated), or ``q`` is not a record.
        ValueError: shapes or devices do not fit.

    Example:
        >>> q = nf4lib.quantize(torch.randn(256, 128))
        >>> nf4lib.quantized_linear(torch.randn(4, 128), q).shape
        torch.Size([4, 256])
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if not isinstance(q.shape, tuple) or len(q.shape) != 2:
        raise ValueError(f"q must be a 2-D weight (out_features, in_features), got shape {q.shape}")
    validate(q, "quantized_linear")
    out_f, in_f = q.shape
    check_linear_input(x, in_f, q.packed.device, "quantized_linear")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},) for out_features {out_f}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return linear_parts(x, op_args(q), bias)
