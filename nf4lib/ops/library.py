"""The three ``torch.library`` ops, each defined once with its fake kernel, and the one
way every device registers kernels for them (``register_kernel``). Kernels live in
``nf4lib/backends/``: ``default`` (every device: the readable pure-PyTorch reference),
``cpu`` (native C) and ``triton`` (CUDA and XPU); this module imports none of them.

* ``nf4lib::quantize``: flattened ``x`` -> (packed codes, per-block scales);
* ``nf4lib::dequantize``: the stored parts -> ``w ~= code[q] * absmax[block]``;
* ``nf4lib::quantized_linear``: ``y = x @ dequantize(W).T + bias`` without the full weight;
* ``nf4lib::quantized_linear_grad``: ``dL/dx = dL/dy @ dequantize(W)``, its backward.

The weight travels as its stored parts under bitsandbytes' names (packed codes, absmax or
its 8-bit codes, quant_map, and the nested parts of double quantization); a kernel
receives it as one :class:`QuantizedTensor`, rebuilt and checked at the door here, so
whoever calls an op (the public functions, ``torch.ops`` directly, a compiled graph, an
``NF4Tensor``'s matmul) gets its buffers checked before any kernel reads them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.checks import FLOAT_DTYPES, SCALES, check_pow2, validate
from ..core.records import QuantizedTensor, scales_from_parts

__all__ = ["register_kernel", "op_args", "dequantize_args", "record_from_args", "check_linear_input", "map_each", "OPS"]

_NESTED = "Tensor? nested_absmax=None, Tensor? nested_quant_map=None, Tensor? nested_offset=None, int? nested_blocksize=None"
torch.library.define(
    "nf4lib::quantize",
    "(Tensor x, int blocksize, Tensor code, Tensor thresholds, Tensor? to_storage=None, str scale='absmax', "
    "Tensor? weights=None) -> (Tensor, Tensor)",
)
torch.library.define(
    "nf4lib::dequantize",
    f"(Tensor packed, Tensor absmax, Tensor quant_map, SymInt[] shape, int blocksize, ScalarType dtype, {_NESTED}) -> Tensor",
)
# bitsandbytes' gemm_4bit shape: the input, the stored weight, its geometry, then bias
# and the optional double-quantization parts.
torch.library.define(
    "nf4lib::quantized_linear",
    "(Tensor x, Tensor packed, Tensor absmax, Tensor quant_map, int out_features, int in_features, "
    f"int blocksize=64, Tensor? bias=None, {_NESTED}) -> Tensor",
)
torch.library.define(
    "nf4lib::quantized_linear_grad",
    "(Tensor grad, Tensor packed, Tensor absmax, Tensor quant_map, int out_features, int in_features, "
    f"int blocksize=64, {_NESTED}) -> Tensor",
)
OPS = ("quantize", "dequantize", "quantized_linear", "quantized_linear_grad")


def op_args(q: QuantizedTensor) -> dict:
    """``quantized_linear``'s weight arguments for a 2-D record, by name (``x`` and ``bias`` excluded)."""
    out_f, in_f = q.shape
    return {
        "packed": q.packed, "quant_map": q.code, "out_features": out_f, "in_features": in_f,
        "blocksize": q.blocksize, **q.scales.op_parts(),
    }


def dequantize_args(q: QuantizedTensor) -> dict:
    """``dequantize``'s arguments for a record of any shape, by name (``dtype`` excluded)."""
    return {"packed": q.packed, "quant_map": q.code, "shape": list(q.shape), "blocksize": q.blocksize, **q.scales.op_parts()}


def record_from_args(packed, absmax, quant_map, shape, blocksize, nested_absmax=None, nested_quant_map=None,
                     nested_offset=None, nested_blocksize=None, dtype=torch.float32) -> QuantizedTensor:
    """The :class:`QuantizedTensor` an op's arguments describe (tensors shared, not copied)."""
    scales = scales_from_parts(absmax, nested_absmax, nested_quant_map, nested_offset, nested_blocksize)
    return QuantizedTensor(packed, scales, quant_map, tuple(shape), dtype, blocksize)


# ----------------------------------------------------------------------------- the doors
def check_linear_input(x, in_features: int, device, where: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating point tensor (fp32, fp16 or bf16), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: x's last dimension {tuple(x.shape)[-1:] or '()'} does not match in_features {in_features}")
    if x.device != device:
        raise ValueError(f"{where}: x is on {x.device} but the quantized weight is on {device}")


def _check_linear(x: Tensor, q: QuantizedTensor, bias: Optional[Tensor]) -> None:
    """What a linear kernel may assume: a valid record, ``x`` of shape ``(..., in_features)``
    and ``bias`` of ``(out_features,)``, all on one device (a few microseconds)."""
    where = "nf4lib::quantized_linear"
    validate(q, where, check_dtype=False)  # the op's record carries x's dtype, which may be float64
    check_linear_input(x, q.shape[1], q.packed.device, where)
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (q.shape[0],) or not bias.is_floating_point():
            raise ValueError(f"{where}: bias must be a float tensor of shape ({q.shape[0]},), got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
        if bias.device != x.device:
            raise ValueError(f"{where}: bias is on {bias.device} but x is on {x.device}")


def _check_quantize(x, blocksize, code, thresholds, to_storage, scale, weights) -> None:
    """What a quantize kernel may assume: a 1-D float ``x``, a blocksize the kernels take,
    the search tables of a codebook of at most 16 levels, all on ``x``'s device."""
    where = "nf4lib::quantize"
    if x.dim() != 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: x must be a 1-D float32/float16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}")
    check_pow2(blocksize, "blocksize", 16, 65536, where)
    if scale not in SCALES:
        raise ValueError(f"{where}: scale must be one of {SCALES}, got {scale!r}")
    parts = {"code": (code, None), "thresholds": (thresholds, (15,)), "to_storage": (to_storage, (16,)), "weights": (weights, None)}
    for what, (t, shape) in parts.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{where}: {what} is on {t.device} but x is on {x.device}")
        if (shape is not None and tuple(t.shape) != shape) or t.dim() != 1:
            raise ValueError(f"{where}: {what} must be 1-D{'' if shape is None else f' of shape {shape}'}, got {tuple(t.shape)}")
    if not 1 <= code.numel() <= 16 or not code.is_floating_point():
        raise ValueError(f"{where}: code must be a float tensor of 1..16 levels, got {code.dtype} {tuple(code.shape)}")
    if weights is not None and (weights.dtype != torch.float32 or weights.numel() == 0):
        raise ValueError(f"{where}: weights must be a non-empty float32 tensor, got {weights.dtype} {tuple(weights.shape)}")


def register_kernel(op: str, device_type: Optional[str]):
    """Decorator: register a kernel of ``nf4lib::<op>`` for ``device_type`` (None: every
    device without its own). Kernels take records, not the op's loose arguments:

    * ``quantize``: ``fn(x, blocksize, code, thresholds, to_storage, scale, weights) ->
      (packed, scales)`` with ``x`` 1-D; raises ``ValueError`` on NaN/Inf in ``x``;
    * ``dequantize``: ``fn(q: QuantizedTensor, dtype) -> Tensor`` of ``q.shape``;
    * ``quantized_linear``: ``fn(x, q: QuantizedTensor, bias) -> y``;
    * ``quantized_linear_grad``: ``fn(grad, q: QuantizedTensor) -> grad @ W`` in grad's dtype.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")

    def wrap(fn):
        if op == "quantize":
            def kernel(x, blocksize, code, thresholds, to_storage=None, scale="absmax", weights=None):
                _check_quantize(x, blocksize, code, thresholds, to_storage, scale, weights)
                return fn(x, blocksize, code, thresholds, to_storage, scale, weights)
        elif op == "dequantize":
            def kernel(packed, absmax, quant_map, shape, blocksize, dtype, nested_absmax=None, nested_quant_map=None,
                       nested_offset=None, nested_blocksize=None):
                q = record_from_args(packed, absmax, quant_map, shape, blocksize, nested_absmax, nested_quant_map,
                                     nested_offset, nested_blocksize, dtype)
                validate(q, "nf4lib::dequantize", check_dtype=False)
                if dtype not in FLOAT_DTYPES + (torch.float64,):
                    raise ValueError(f"nf4lib::dequantize: dtype must be a floating point dtype, got {dtype}")
                return fn(q, dtype)
        elif op == "quantized_linear_grad":
            def kernel(grad, packed, absmax, quant_map, out_features, in_features, blocksize=64,
                       nested_absmax=None, nested_quant_map=None, nested_offset=None, nested_blocksize=None):
                q = record_from_args(packed, absmax, quant_map, (out_features, in_features), blocksize,
                                     nested_absmax, nested_quant_map, nested_offset, nested_blocksize, grad.dtype)
                where = "nf4lib::quantized_linear_grad"
                validate(q, where, check_dtype=False)
                check_linear_input(grad, out_features, q.packed.device, where)
                return fn(grad, q)
        else:
            def kernel(x, packed, absmax, quant_map, out_features, in_features, blocksize=64, bias=None,
                       nested_absmax=None, nested_quant_map=None, nested_offset=None, nested_blocksize=None):
                q = record_from_args(packed, absmax, quant_map, (out_features, in_features), blocksize,
                                     nested_absmax, nested_quant_map, nested_offset, nested_blocksize, x.dtype)
                _check_linear(x, q, bias)
                return fn(x, q, bias)

        torch.library.register_kernel(f"nf4lib::{op}", device_type, kernel)
        return fn

    return wrap


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("nf4lib::quantize")
def _quantize_fake(x, blocksize, code, thresholds, to_storage=None, scale="absmax", weights=None):
    n = x.numel()
    return x.new_empty(((n + 1) // 2,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.register_fake("nf4lib::dequantize")
def _dequantize_fake(packed, absmax, quant_map, shape, blocksize, dtype, nested_absmax=None, nested_quant_map=None,
                     nested_offset=None, nested_blocksize=None):
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("nf4lib::quantized_linear")
def _linear_fake(x, packed, absmax, quant_map, out_features, in_features, blocksize=64, bias=None,
                 nested_absmax=None, nested_quant_map=None, nested_offset=None, nested_blocksize=None):
    torch._check(x.is_floating_point(), lambda: f"x must be floating point, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(x.shape[-1] == in_features, lambda: f"x's last dim {x.shape[-1]} != in_features {in_features}")
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    n = out_features * in_features
    torch._check(packed.numel() == (n + 1) // 2, lambda: f"packed has {packed.numel()} bytes, expected {(n + 1) // 2}")
    torch._check(absmax.numel() == -(-n // blocksize), lambda: f"absmax has {absmax.numel()} entries, expected {-(-n // blocksize)}")
    torch._check(quant_map.dim() == 1 and quant_map.numel() <= 16, lambda: "quant_map must be 1-D with <= 16 levels")
    if nested_absmax is None:
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    else:
        torch._check(absmax.dtype == torch.uint8, lambda: "double-quantized absmax codes must be uint8")
        torch._check(nested_quant_map is not None and nested_offset is not None, lambda: "nested parts must come together")
    if bias is not None:
        torch._check(bias.shape == (out_features,), lambda: f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("nf4lib::quantized_linear_grad")
def _linear_grad_fake(grad, packed, absmax, quant_map, out_features, in_features, blocksize=64,
                      nested_absmax=None, nested_quant_map=None, nested_offset=None, nested_blocksize=None):
    torch._check(grad.shape[-1] == out_features, lambda: f"grad's last dim {grad.shape[-1]} != out_features {out_features}")
    return grad.new_empty((*grad.shape[:-1], in_features))


# ----------------------------------------------------------------------------- vmap
def map_each(op, info, in_dims, args):
    """One op call per batch element, outputs stacked along dim 0: the batching rule of
    quantize and dequantize (whose batched inputs are whole weights, not rows), and of the
    linear ops when a weight or bias is batched. ``args`` are the op's arguments in order."""
    dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    outs = []
    for i in range(info.batch_size):
        outs.append(op(*[a.select(d, i) if d is not None and isinstance(a, Tensor) else a for a, d in zip(args, dims)]))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


@torch.library.register_vmap("nf4lib::quantize")
def _quantize_vmap(info, in_dims, x, blocksize, code, thresholds, to_storage=None, scale="absmax", weights=None):
    return map_each(torch.ops.nf4lib.quantize.default, info, in_dims, (x, blocksize, code, thresholds, to_storage, scale, weights))


@torch.library.register_vmap("nf4lib::dequantize")
def _dequantize_vmap(info, in_dims, packed, absmax, quant_map, shape, blocksize, dtype, nested_absmax=None,
                     nested_quant_map=None, nested_offset=None, nested_blocksize=None):
    args = (packed, absmax, quant_map, shape, blocksize, dtype, nested_absmax, nested_quant_map, nested_offset, nested_blocksize)
    return map_each(torch.ops.nf4lib.dequantize.default, info, in_dims, args)
