"""Blockwise 4-bit quantize / dequantize in the bitsandbytes layout: the public functions.

For element ``i`` of the row-major flattened tensor, block ``b = i // blocksize``:

    ``absmax[b] = max |x[block b]|``
    ``q[i] = nearest level to x[i] * (1 / absmax[b])`` (a tie goes to the lower level)
    ``w[i] ~= code[q[i]] * absmax[b]``, computed in float32, then cast

Codes are packed two per byte, the even element in the high nibble. These rules,
including bitsandbytes' float32 reciprocal for full blocks and division for the
partial last block, make the bytes equal bitsandbytes' ``quantize_4bit``.

Each function checks its input, calls its op (``nf4lib::quantize`` / ``nf4lib::dequantize``,
see ``ops.library``; the kernels are in ``nf4lib/backends/``) and returns a record.
"""

from __future__ import annotations

import torch

from ..core.checks import check_float_input, check_output_dtype, check_weights, validate
from ..core.codebooks import code_tables
from ..core.double import double_quantize
from ..core.records import QuantizedTensor
from ..core.spec import QuantSpec, deprecated_keyword, settings
from .library import dequantize_args

__all__ = ["quantize", "dequantize", "bits_per_parameter"]

_quantize_op = torch.ops.nf4lib.quantize.default
_dequantize_op = torch.ops.nf4lib.dequantize.default


def quantize(x: torch.Tensor, *, blocksize: int = 64, code="nf4", double_quant: bool = False,
             scale: str = "absmax", importance=None, spec: QuantSpec | None = None, weights=None) -> QuantizedTensor:
    """Quantize a float tensor to 4 bits, blockwise, in bitsandbytes' layout.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (empty too). Not modified.
        blocksize: elements per absmax block, a power of two in [16, 65536].
        code: ``"nf4"`` (default), ``"fp4"``, ``"int4"`` or a sorted 1-D tensor of at
            most 16 levels in [-1, 1].
        double_quant: also quantize the absmax vector to 8 bits (QLoRA).
        scale: ``"absmax"`` (default: bitsandbytes' bytes exactly) or ``"mse"``: each
            block's scale searched to minimise its squared error (see ``nf4lib.core.mse``;
            13% lower MSE on Gaussian weights, 7-9x the time on CPU). Stored where absmax
            goes, so bitsandbytes dequantizes it unchanged.
        importance: with ``scale="mse"``, optional non-negative importance weights of
            ``x``'s shape or ``(x.shape[-1],)`` (e.g. the inputs' mean squares per input
            feature, so the search minimises the layer's output error).
        spec: the four settings above as one :class:`QuantSpec` (then leave them unset).
        weights: the old name of ``importance`` (deprecated).

    Returns:
        A :class:`QuantizedTensor`; ``packed`` is uint8 ``(ceil(numel/2),)``.

    Raises:
        TypeError: ``x`` is not a float tensor.
        ValueError: NaN/Inf in ``x`` (with the count and first block), a bad blocksize
            or codebook.

    Example:
        >>> q = quantize(torch.randn(4096, 4096, dtype=torch.bfloat16))
        >>> w = dequantize(q)  # bf16, same shape; |w - x| is at most half a level gap * absmax
    """
    check_float_input(x)
    if weights is not None:
        importance = deprecated_keyword("weights", "importance", "quantize", weights, importance)
    spec = settings(spec, "quantize", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
    if importance is not None and spec.scale != "mse":
        raise ValueError("importance weights apply only with scale='mse'")
    levels, thresholds, to_storage, identity = code_tables(spec.code)
    device = x.device
    levels = levels.to(device)
    storage = None if identity else to_storage.to(device)
    packed, absmax = _quantize_op(x.detach().reshape(-1), spec.blocksize, levels, thresholds.to(device), storage, spec.scale,
                                  check_weights(importance, x))
    stored = double_quantize(absmax) if spec.double_quant else absmax
    return QuantizedTensor(packed, stored, levels, tuple(x.shape), x.dtype, spec.blocksize)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the tensor: ``w[i] = code[q[i]] * absmax[i // blocksize]`` in float32, then cast.

    Args:
        q: a :class:`QuantizedTensor` (plain or double-quantized).
        dtype: output dtype; default the original ``q.dtype``.

    Returns:
        Tensor of shape ``q.shape``, equal to bitsandbytes ``dequantize_4bit`` bit for bit.

    Raises:
        ValueError: ``packed`` / ``absmax`` do not fit ``shape`` and ``blocksize``, or
            ``dtype`` is not a floating point dtype.
    """
    validate(q)  # shapes and dtypes only: traced too (torch.compile, vmap), so compiled code checks them as well
    dtype = q.dtype if dtype is None else dtype
    check_output_dtype(dtype)
    if q.numel == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    return _dequantize_op(dtype=dtype, **dequantize_args(q))


def bits_per_parameter(q: QuantizedTensor) -> float:
    """Stored bits per element: packed codes plus absmax (or its 8-bit codes, scales and
    offset). The codebooks (16 and 256 floats, shared constants) are not counted.

    4.5 at blocksize 64; 4.127 with double quantization (4 + 8/64 + 32/(64*256)).
    """
    return (q.packed.numel() * 8 + q.scales.stored_bits) / max(q.numel, 1)
