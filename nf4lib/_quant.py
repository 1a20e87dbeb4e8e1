"""Layer 2: blockwise 4-bit quantize / dequantize, the bitsandbytes layout.

For element ``i`` of the row-major flattened tensor, block ``b = i // blocksize``:

    ``absmax[b] = max |x[block b]|``
    ``q[i] = nearest level to x[i] * (1 / absmax[b])`` (a tie goes to the lower level)
    ``w[i] ~= code[q[i]] * absmax[b]``, computed in float32, then cast

Codes are packed two per byte, the even element in the high nibble. These rules,
including bitsandbytes' float32 reciprocal for full blocks and division for the
partial last block, make the bytes equal bitsandbytes' ``quantize_4bit``.
"""

from __future__ import annotations

import torch

from . import _compiled, _native
from ._codebooks import CODE_NAMES, build_search_tables, named_code, named_thresholds, named_to_storage, resolve_code
from ._double import double_quantize
from ._halves import run_halves
from ._hugepages import empty_large
from ._mse import check_weights, quantize_mse
from ._records import DoubleQuantized, QuantizedTensor

__all__ = [
    "quantize", "dequantize", "bits_per_parameter", "check_blocksize", "check_flag", "validate", "check_finite", "pair_table",
    "dequantize_blocks_into", "native_usable", "register_device_kernels",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Eager work is done this many elements at a time, so temporaries stay small
# (quantize's extra peak memory stays under the input's size).
_CHUNK = 1 << 20
# dequantize goes 256K elements at a time: its 1 MiB of float32 pairs stays in cache
# between the gather and the multiply (measured ~1.4x faster than 1M on 2 cores).
_DEQUANT_CHUNK = 1 << 18
# From this many elements, CPU dequantize runs its two halves on two threads.
_SPLIT_MIN = 1 << 22
# Above this size the fused, compiled kernels pay for their one-off compile.
_COMPILE_MIN = 1 << 21


# device type -> (dequantize(q, dtype) -> Tensor | None, quantize_into(...) -> bool), filled
# by the device backends (layer 4) so this layer never imports them.
_DEVICE_KERNELS: dict = {}


def register_device_kernels(device_type: str, dequantize, quantize_into) -> None:
    """Let a backend serve ``dequantize`` / ``quantize`` for tensors on ``device_type``.

    ``dequantize(q, dtype)`` returns the tensor or None (not handled);
    ``quantize_into(flat, blocksize, thresholds, storage, packed, absmax)`` fills the
    outputs and returns True, or returns False (not handled). Both must give exactly the
    bytes and values of the pure-PyTorch path.
    """
    _DEVICE_KERNELS[device_type] = (dequantize, quantize_into)


def _device_kernels(device: torch.device):
    if device.type == "cpu" or _transforms_active():
        return None
    return _DEVICE_KERNELS.get(device.type)


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"blocksize must be an int power of two in [16, 65536], got {blocksize!r}")
    if blocksize < 16 or blocksize > 65536 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [16, 65536], got {blocksize}")
    return blocksize


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize expects a float32, float16 or bfloat16 tensor, got {x.dtype}")


def _transforms_active() -> bool:
    """True under torch.compile tracing or a torch.func transform (vmap, grad)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _raise_not_finite(flat: torch.Tensor, blocksize: int) -> None:
    bad = ~torch.isfinite(flat)
    count = int(bad.sum())
    first = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"quantize: input has {count} NaN/Inf value(s); the first is element {first} "
        f"(block {first // blocksize} at blocksize {blocksize})"
    )


def _levels_below(scaled: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Sorted level index of each value: ``#{t : t < v}`` over the 15 (+inf padded)
    thresholds, so a value exactly on a threshold goes to the lower level (bitsandbytes'
    rule). Written as 15 compare-adds rather than ``bucketize`` so inductor fuses it into
    one loop; eagerly the two are about as fast."""
    q = (scaled > thresholds[0]).to(torch.int32)
    for k in range(1, 15):
        q = q + (scaled > thresholds[k]).to(torch.int32)
    return q


def _encode(scaled: torch.Tensor, thresholds: torch.Tensor, to_storage) -> torch.Tensor:
    """Packed bytes of values scaled to [-1, 1]: nearest level, in storage order, two per byte.

    ``to_storage`` maps sorted level index to storage index, None when they agree (every
    codebook but FP4; the gather costs ~2x)."""
    q = _levels_below(scaled, thresholds)
    if to_storage is not None:
        q = to_storage[q].to(torch.int32)
    q = q.reshape(-1, 2)
    return ((q[:, 0] << 4) | q[:, 1]).to(torch.uint8)  # even element in the high nibble


def _quantize_rows(rows: torch.Tensor, thresholds: torch.Tensor, to_storage):
    """Quantize full blocks: ``rows`` (n_blocks, blocksize) any float dtype -> (packed, absmax).

    The one row kernel: ``_compiled`` fuses it.
    """
    rows = rows.float()
    absmax = rows.abs().amax(dim=1)
    scaled = (rows * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return _encode(scaled, thresholds, to_storage), absmax


_fused_rows = _compiled.compiled(_quantize_rows)


def _quantize_tail(tail: torch.Tensor, thresholds, to_storage):
    """The partial last block: bitsandbytes divides here, clamps absmax at 1e-38, and pads one 0."""
    tail = tail.float()
    am = tail.abs().amax().clamp(min=1e-38)
    scaled = (tail / am).clamp(-1, 1)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    return _encode(scaled, thresholds, to_storage), am.reshape(1)


def check_flag(value, name: str) -> bool:
    """A yes/no option must be a bool: ``double_quant="no"`` would otherwise read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


SCALES = ("absmax", "mse")


def check_scale(scale) -> str:
    if not isinstance(scale, str) or scale.lower() not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale.lower()


def quantize(x: torch.Tensor, *, blocksize: int = 64, code="nf4", double_quant: bool = False,
             scale: str = "absmax", weights=None) -> QuantizedTensor:
    """Quantize a float tensor to 4 bits, blockwise, in bitsandbytes' layout.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (empty too). Not modified.
        blocksize: elements per absmax block, a power of two in [16, 65536].
        code: ``"nf4"`` (default), ``"fp4"``, ``"int4"`` or a sorted 1-D tensor of at
            most 16 levels in [-1, 1].
        double_quant: also quantize the absmax vector to 8 bits (QLoRA).
        scale: ``"absmax"`` (default: bitsandbytes' bytes exactly) or ``"mse"``: each
            block's scale searched to minimise its squared error (see ``nf4lib._mse``;
            13% lower MSE on Gaussian weights, 7-9x the time on CPU). Stored where absmax
            goes, so bitsandbytes dequantizes it unchanged.
        weights: with ``scale="mse"``, optional non-negative importance weights of
            ``x``'s shape or ``(x.shape[-1],)`` (e.g. the inputs' mean squares per input
            feature, so the search minimises the layer's output error).

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
    _check_input(x)
    check_blocksize(blocksize)
    check_flag(double_quant, "double_quant")
    scale = check_scale(scale)
    if weights is not None and scale != "mse":
        raise ValueError("weights apply only with scale='mse'")
    if isinstance(code, str):
        name = code.lower()
        if name not in CODE_NAMES:
            raise ValueError(f"unknown code {code!r}; expected one of {CODE_NAMES} or a tensor")
        levels, thresholds, to_storage = named_code(name), named_thresholds(name), named_to_storage(name)
        identity = name != "fp4"
    else:
        if _transforms_active():
            levels = code.detach().to(torch.float32)
            identity = False  # unvalidated: a gather through to_storage is right for any order
        else:
            levels = resolve_code(code)
            identity = True  # validated sorted, so storage order is sorted order
        thresholds, to_storage = build_search_tables(levels)
    device = x.device
    thresholds = thresholds.to(device)
    storage = None if identity else to_storage.to(device)
    flat = x.detach().reshape(-1)
    n = flat.numel()

    def record(packed, absmax):
        stored = double_quantize(absmax) if double_quant else absmax
        return QuantizedTensor(packed, stored, levels.to(device), tuple(x.shape), x.dtype, blocksize)

    if scale == "mse":
        packed, found, ok = quantize_mse(flat, blocksize, levels.to(device), thresholds, to_storage, check_weights(weights, x))
        if not ok:
            _raise_not_finite(flat, blocksize)
        return record(packed, found)
    in_place = not _transforms_active()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    if in_place and _native.usable(flat):
        # the native kernel: the same bytes in one pass, multithreaded, nothing to compile
        if not _native.quantize_into(flat.contiguous(), blocksize, thresholds, storage, packed, absmax):
            _raise_not_finite(flat, blocksize)
        return record(packed, absmax)
    kernels = _device_kernels(device)  # Triton on CUDA / XPU
    if kernels is not None and n and kernels[1](flat.contiguous(), blocksize, thresholds, storage, packed, absmax):
        if not bool(torch.isfinite(absmax).all()):  # non-finite input shows in its block's absmax
            _raise_not_finite(flat, blocksize)
        return record(packed, absmax)
    # Eager: write each chunk's result into preallocated outputs (no concatenation copy,
    # so extra peak memory is the outputs plus one chunk). Under transforms: concatenate.
    full = n - n % blocksize
    packed_parts, absmax_parts = [], []

    def emit(p, a, row):
        if in_place:
            packed[row * blocksize // 2 : row * blocksize // 2 + p.numel()].copy_(p)
            absmax[row : row + a.numel()].copy_(a)
        else:
            packed_parts.append(p)
            absmax_parts.append(a)

    if full:
        rows = flat[:full].view(-1, blocksize)
        fused = n >= _COMPILE_MIN and in_place and _compiled.enabled()
        kernel = _fused_rows if fused else _quantize_rows
        step = max(1, (2 * _CHUNK if fused else _CHUNK) // blocksize)
        for s in range(0, rows.shape[0], step):
            emit(*kernel(rows[s : s + step], thresholds, storage), s)
    if n > full:
        emit(*_quantize_tail(flat[full:], thresholds, storage), full // blocksize)
    if not in_place and packed_parts:
        packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)
    # A NaN or Inf anywhere makes its block's absmax NaN or Inf: check the small vector.
    if not _transforms_active() and not bool(torch.isfinite(absmax).all()):
        _raise_not_finite(flat, blocksize)
    return record(packed, absmax)


def _check_pow2(value, what: str, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi or value & (value - 1):
        raise ValueError(f"{where}: {what} must be an int power of two in [{lo}, {hi}], got {value!r}")
    return value


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
    source dtype, which the op's kernels do not read (they compute in ``x``'s dtype).

    Raises:
        TypeError: ``q`` is not a record, or a field has the wrong type.
        ValueError: a field does not fit the others; the message names it.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"{where} expects a QuantizedTensor, got {type(q).__name__}")
    shape = q.shape
    if not isinstance(shape, tuple) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"{where}: shape must be a tuple of non-negative ints, got {shape!r}")
    _check_pow2(q.blocksize, "blocksize", 16, 65536, where)
    if check_dtype and q.dtype not in _FLOAT_DTYPES:
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
        _check_pow2(a.blocksize, "the double-quant (nested) blocksize", 2, 65536, where)
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


def check_output_dtype(dtype) -> None:
    if dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"dtype must be a floating point dtype (float32, float16, bfloat16, float64), got {dtype!r}")


def _dequantize_pure(packed, absmax, code, n: int, blocksize: int, dtype) -> torch.Tensor:
    """Functional form (no out=, no loops): works under vmap and torch.compile."""
    q = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n].long()
    values = code[q]
    full = n - n % blocksize
    head = (values[:full].reshape(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if full == n:
        return head.to(dtype)
    return torch.cat([head, values[full:] * absmax[-1]]).to(dtype)


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64 whose 8 bytes are the float32 pair (code[b >> 4], code[b & 15])."""
    c = torch.zeros(16, dtype=torch.float32, device=code.device)
    c[: code.numel()] = code
    return torch.stack([c.repeat_interleave(16), c.repeat(16)], dim=1).contiguous().view(torch.int64).view(-1)


def dequantize_blocks_into(out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table, blocksize: int) -> None:
    """Write whole blocks: ``out`` (n,) any float dtype, n a multiple of blocksize.

    One 8-byte gather per byte into the pair table, then ``w = pair * absmax`` computed in
    float32 and written straight into ``out``'s dtype (the same rounding as a cast after).
    """
    index = packed.reshape(-1).int()
    if out.dtype == torch.float32:
        # the pairs land straight in the output and are scaled in place: one pass fewer
        torch.index_select(table, 0, index, out=out.view(torch.int64))
        out.view(-1, blocksize).mul_(absmax[:, None])
        return
    pairs = table.index_select(0, index)
    torch.mul(pairs.view(torch.float32).view(-1, blocksize), absmax[:, None], out=out.view(-1, blocksize))


def _dequantize_chunked(packed, absmax, code, n: int, blocksize: int, dtype) -> torch.Tensor:
    """Eager fast path: whole blocks a chunk at a time, then the partial last block."""
    out = empty_large(n, dtype, packed.device)
    table = pair_table(code)
    full = n - n % blocksize
    step = max(1, _DEQUANT_CHUNK // blocksize) * blocksize

    def blocks(lo, hi):
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            dequantize_blocks_into(out[s:e], packed[s // 2 : e // 2], absmax[s // blocksize : e // blocksize], table, blocksize)

    if packed.device.type == "cpu" and full >= _SPLIT_MIN and torch.get_num_threads() > 1:
        run_halves(blocks, 0, full, blocksize)  # two cores on the (serial) gathers
    else:
        blocks(0, full)
    if full < n:
        pairs = table.index_select(0, packed[full // 2 :].int()).view(torch.float32)[: n - full]
        torch.mul(pairs, absmax[-1], out=out[full:])
    return out


def native_usable(q: QuantizedTensor, *others, in_kernel: bool = False) -> bool:
    """True when the native CPU kernels can take the validated record ``q`` (and the
    tensors ``others``, None allowed): plain CPU tensors outside transforms (see
    ``_native.usable``, and its ``in_kernel``)."""
    a = q.absmax
    parts = (a.codes, a.scales, a.offset, a.code) if q.double_quant else (a,)
    return _native.usable(q.packed, q.code, *parts, *others, in_kernel=in_kernel)


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
    n = q.numel
    if n == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    if dtype in _FLOAT_DTYPES and native_usable(q):
        # the native kernel: one pass, double-quantized scales decoded in it
        out = empty_large(n, dtype, q.packed.device)
        _native.decode_into(out, q)
        return out.view(q.shape)
    kernels = _device_kernels(q.packed.device)
    if kernels is not None:
        out = kernels[0](q, dtype)
        if out is not None:
            return out
    absmax = q.scales.dequantize()
    code = q.code.to(torch.float32)
    if _transforms_active():
        out = _dequantize_pure(q.packed, absmax, code, n, q.blocksize, dtype)
    else:
        out = _dequantize_chunked(q.packed, absmax, code, n, q.blocksize, dtype)
    return out.view(q.shape)


def bits_per_parameter(q: QuantizedTensor) -> float:
    """Stored bits per element: packed codes plus absmax (or its 8-bit codes, scales and
    offset). The codebooks (16 and 256 floats, shared constants) are not counted.

    4.5 at blocksize 64; 4.127 with double quantization (4 + 8/64 + 32/(64*256)).
    """
    return (q.packed.numel() * 8 + q.scales.stored_bits) / max(q.numel, 1)
