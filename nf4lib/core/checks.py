"""Checks of user input and of records, written once: every public function and every
kernel's door calls these, so a setting means the same thing everywhere and a malformed
record never reaches native code.

Each raises ``TypeError`` (wrong kind of value) or ``ValueError`` (a value out of range, or
fields that do not fit each other) naming the offending value.
"""

from __future__ import annotations

import torch

from .records import DoubleQuantized, QuantizedTensor

__all__ = [
    "FLOAT_DTYPES", "SCALES", "check_pow2", "check_blocksize", "check_flag", "check_scale", "check_float_input", "check_output_dtype",
    "check_weights", "validate", "check_finite", "raise_not_finite", "transforms_active",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# how each block's scale is chosen: its absmax (bitsandbytes' bytes) or an error-minimising search
SCALES = ("absmax", "mse")


def transforms_active() -> bool:
    """True under torch.compile tracing or a torch.func transform (vmap, grad)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def check_pow2(value, what: str, lo: int, hi: int, where: str) -> int:
    """``value`` is an int power of two in [lo, hi]; the error names ``where`` and ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise ValueError(f"{where}: {what} must be an int power of two in [{lo}, {hi}], got {value!r}")
    return value


def check_blocksize(blocksize) -> int:
    """Elements per absmax block: an int power of two in [16, 65536] (bitsandbytes' range
    is 64..4096; other sizes are nf4lib's own)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"blocksize must be an int power of two in [16, 65536], got {blocksize!r}")
    if blocksize < 16 or blocksize > 65536 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [16, 65536], got {blocksize}")
    return blocksize


def check_flag(value, name: str) -> bool:
    """A yes/no option must be a bool: ``double_quant="no"`` would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_scale(scale) -> str:
    if not isinstance(scale, str) or scale.lower() not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale.lower()


def check_float_input(x, where: str = "quantize") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where} expects a float32, float16 or bfloat16 tensor, got {x.dtype}")


def check_output_dtype(dtype) -> None:
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"dtype must be a floating point dtype (float32, float16, bfloat16, float64), got {dtype!r}")


def check_weights(weights, x: torch.Tensor) -> torch.Tensor | None:
    """Importance weights as a contiguous float32 tensor whose element ``i % len`` weighs
    element ``i`` of the flattened ``x``: shape ``x.shape`` or ``(x.shape[-1],)`` (one per
    input feature), non-negative and finite."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"importance weights must be a tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"importance weights must be a floating point tensor, got {weights.dtype}")
    shape = tuple(weights.shape)
    if shape != tuple(x.shape) and (x.dim() == 0 or shape != (x.shape[-1],)):
        raise ValueError(f"importance weights must have shape {tuple(x.shape)} or ({x.shape[-1] if x.dim() else 1},), got {shape}")
    if weights.device != x.device:
        raise ValueError(f"importance weights are on {weights.device} but the tensor is on {x.device}")
    w = weights.detach().to(torch.float32).reshape(-1).contiguous()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("importance weights must be finite and non-negative")
    return w


def raise_not_finite(flat: torch.Tensor, blocksize: int) -> None:
    """Raise the error for a tensor holding NaN or Inf, naming the count and the first."""
    bad = ~torch.isfinite(flat)
    count = int(bad.sum())
    first = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"quantize: input has {count} NaN/Inf value(s); the first is element {first} "
        f"(block {first // blocksize} at blocksize {blocksize})"
    )


def _check_tensor(t, what: str, dtype, numel: int, device, where: str, q=None) -> None:
    """``t`` is a 1-D tensor of ``dtype`` with ``numel`` entries on ``device`` (the message,
    naming ``q``'s shape and blocksize, is only formatted on failure: this runs every call)."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {what} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.dim() != 1 or t.numel() != numel or t.device != device:
        at = where if q is None else f"{where} (shape {q.shape}, blocksize {q.blocksize})"
        if t.device != device:
            raise ValueError(f"{at}: {what} is on {t.device} but packed is on {device}")
        raise ValueError(f"{at}: {what} must be {str(dtype).replace('torch.', '')} of shape ({numel},), got {t.dtype} {tuple(t.shape)}")


def validate(q: QuantizedTensor, where: str = "dequantize", *, check_dtype: bool = True) -> None:
    """Check that a record's fields describe buffers the kernels may read: the shape's
    dims, the blocksizes, and every tensor's dtype, size and device (once, at the door of
    the kernels; a few microseconds, no pass over the data). ``check_dtype=False`` skips the
    source dtype, which the ops' kernels do not read (they take the output dtype).

    Raises:
        TypeError: ``q`` is not a record, or a field has the wrong type.
        ValueError: a field does not fit the others; the message names it.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"{where} expects a QuantizedTensor, got {type(q).__name__}")
    shape = q.shape
    if not isinstance(shape, tuple) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"{where}: shape must be a tuple of non-negative ints, got {shape!r}")
    check_pow2(q.blocksize, "blocksize", 16, 65536, where)
    if check_dtype and q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: QuantizedTensor.dtype must be fp32/fp16/bf16, got {q.dtype!r}")
    if not isinstance(q.packed, torch.Tensor):
        raise TypeError(f"{where}: packed must be a tensor, got {type(q.packed).__name__}")
    n, device = q.numel, q.packed.device
    _check_tensor(q.packed, "packed", torch.uint8, (n + 1) // 2, device, where, q)
    code = q.code
    if not isinstance(code, torch.Tensor) or not code.is_floating_point() or code.dim() != 1 or not 1 <= code.numel() <= 16:
        raise ValueError(f"{where}: code must be a 1-D float tensor of 1..16 levels, got {getattr(code, 'dtype', type(code).__name__)} "
                         f"{tuple(getattr(code, 'shape', ()))}")
    if code.device != device:
        raise ValueError(f"{where}: code is on {code.device} but packed is on {device}")
    a = q.absmax
    if isinstance(a, DoubleQuantized):
        check_pow2(a.blocksize, "the double-quant (nested) blocksize", 2, 65536, where)
        _check_tensor(a.codes, "double-quant codes", torch.uint8, q.n_blocks, device, where, q)
        _check_tensor(a.scales, "double-quant scales", torch.float32, -(-q.n_blocks // a.blocksize), device, where, q)
        _check_tensor(a.code, "the 8-bit map", torch.float32, 256, device, where, q)
        if not isinstance(a.offset, torch.Tensor) or a.offset.numel() != 1 or not a.offset.is_floating_point():
            raise ValueError(f"{where}: the double-quant offset must be one float value, got {a.offset!r}")
        if a.offset.device != device:
            raise ValueError(f"{where}: the double-quant offset is on {a.offset.device} but packed is on {device}")
    else:
        _check_tensor(a, "absmax", torch.float32, q.n_blocks, device, where, q)


def check_finite(q: QuantizedTensor, where: str = "load") -> None:
    """Refuse a record whose stored scales or levels are NaN or Inf (``quantize`` never
    makes one; a file may hold one). One pass over the per-block scales: for loading,
    not for every call."""
    if q.packed.is_meta:
        return
    a = q.absmax
    parts = {"code": q.code}
    if isinstance(a, DoubleQuantized):
        parts.update({"double-quant scales": a.scales, "the 8-bit map": a.code, "double-quant offset": a.offset})
    else:
        parts["absmax"] = a
    for what, t in parts.items():
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t.reshape(-1))).nonzero()[0, 0])
            raise ValueError(f"{where}: {what} holds NaN or Inf (first at index {bad}); the record is corrupt")
