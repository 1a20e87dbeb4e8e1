"""The bitsandbytes interop. A :class:`QuantizedTensor` to and from the exact
state-dict entries bitsandbytes ``Linear4bit`` saves (``QuantState.as_dict(packed=True)``).

For ``prefix="weight"`` bitsandbytes 0.50 writes::

    weight                                  uint8 (ceil(n/2), 1)   two codes per byte
    weight.absmax                           float32 (n_blocks,)    or uint8 codes if nested
    weight.quant_map                        float32 (16,)          the codebook
    weight.nested_absmax                    float32 (n_groups,)    nested only
    weight.nested_quant_map                 float32 (256,)         nested only
    weight.quant_state.bitsandbytes__nf4    uint8 JSON             (or __fp4)

The JSON holds ``quant_type, blocksize, dtype, shape`` and, when nested,
``nested_blocksize, nested_dtype, nested_offset``, in that order, written by
``json.dumps`` with its default separators. Codebooks bitsandbytes has no name
for (INT4, user codebooks) are written under ``quant_state.nf4lib__int4`` /
``quant_state.nf4lib__custom``, and NF4/FP4 at blocksizes outside bitsandbytes'
32..4096 under ``quant_state.nf4lib__nf4`` / ``__fp4``: bitsandbytes refuses them
rather than misreading them.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import torch

from ..core.codebooks import code_name as _code_name
from ..core.checks import check_finite, validate
from ..core.records import DoubleQuantized, QuantizedTensor

__all__ = ["from_bnb", "to_bnb", "QUANT_STATE_SUFFIXES"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
# The blocksizes bitsandbytes 0.50's 4-bit kernels read.
_BNB_BLOCKSIZES = (32, 4096)
# bitsandbytes' quant_storage dtypes (Params4bit): the packed bytes viewed as one of these.
_QUANT_STORAGE = (torch.int8, torch.float16, torch.bfloat16, torch.float32)
# A quant state is ~150 bytes of JSON; refuse absurd ones before decoding them.
_MAX_QUANT_STATE = 1 << 16
# The sub-keys a quantized weight owns, after "<prefix>.".
QUANT_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _quant_type(q: QuantizedTensor, name: str | None = None) -> tuple[str, str]:
    """(JSON key family, quant_type) for ``q``'s codebook (or the given name)."""
    if name is None and not q.code.is_meta:
        name = _code_name(q.code)
    if name in ("nf4", "fp4") and _BNB_BLOCKSIZES[0] <= q.blocksize <= _BNB_BLOCKSIZES[1]:
        return "bitsandbytes", name
    # A codebook or blocksize bitsandbytes cannot read: labelled ours, so bitsandbytes
    # refuses the entry rather than misreading it (nf4lib reads both families).
    return "nf4lib", name or "custom"


def to_bnb(q: QuantizedTensor, prefix: str = "weight", *, code_name: str | None = None) -> dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes ``Linear4bit`` saves for this weight.

    Args:
        q: a :class:`QuantizedTensor` (plain or double-quantized).
        prefix: the weight's key, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
        code_name: the codebook's name when ``q.code`` cannot be read (meta device);
            by default it is recognised from the values.

    Returns:
        A new dict ``{key: tensor}``; the tensors are ``q``'s own (not copied), the
        JSON entry is a new uint8 tensor. For NF4/FP4 the keys and bytes are exactly
        bitsandbytes 0.50's.

    Example:
        >>> sd = nf4lib.to_bnb(nf4lib.quantize(torch.randn(64, 128)))
        >>> sorted(sd)
        ['weight', 'weight.absmax', 'weight.quant_map', 'weight.quant_state.bitsandbytes__nf4']
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"to_bnb expects a QuantizedTensor, got {type(q).__name__}")
    if q.dtype not in _DTYPE_NAMES:
        raise ValueError(f"cannot write dtype {q.dtype} in the bitsandbytes format")
    family, quant_type = _quant_type(q, code_name)
    meta = {"quant_type": quant_type, "blocksize": q.blocksize, "dtype": _DTYPE_NAMES[q.dtype], "shape": list(q.shape)}
    parts = q.scales.op_parts()  # absmax, and the nested_* parts when double-quantized
    out = {prefix: q.packed.reshape(-1, 1), prefix + ".absmax": parts["absmax"], prefix + ".quant_map": q.code}
    if "nested_absmax" in parts:
        out[prefix + ".nested_absmax"] = parts["nested_absmax"]
        out[prefix + ".nested_quant_map"] = parts["nested_quant_map"]
        # The offset travels in the JSON as a Python float (float32 -> double is exact).
        offset = parts["nested_offset"]
        offset = 0.0 if offset.is_meta else float(offset)
        meta.update(nested_blocksize=parts["nested_blocksize"], nested_dtype="float32", nested_offset=offset)
    out[f"{prefix}.quant_state.{family}__{quant_type}"] = quant_state_tensor(meta)
    return out


def quant_state_tensor(meta: dict) -> torch.Tensor:
    """The JSON entry's bytes as bitsandbytes writes them (``json.dumps``, default separators)."""
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def read_quant_state(raw: torch.Tensor) -> dict:
    """The JSON entry's dict (raises ``ValueError`` if the bytes are not a JSON object)."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.numel() > _MAX_QUANT_STATE:
        raise ValueError(f"the quant state must be uint8 JSON bytes of at most {_MAX_QUANT_STATE}, got "
                         f"{getattr(raw, 'dtype', type(raw).__name__)} of {getattr(raw, 'numel', lambda: '?')()} entries")
    try:
        meta = json.loads(bytes(raw.detach().cpu().reshape(-1).tolist()).decode("utf-8"))
    except RecursionError:
        raise ValueError("the quant state's JSON is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"the quant state is not UTF-8 text ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"the quant state must be a JSON object, got {type(meta).__name__}")
    return meta


def _int_field(meta: dict, key: str, default=None) -> int:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return v


def parse_quant_state(meta: dict) -> tuple:
    """``(shape, blocksize, dtype, nested)`` from a quant state's dict, every field checked
    (a file is untrusted input); ``nested`` is ``(nested_blocksize, offset)`` or None."""
    shape = meta.get("shape")
    if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
    blocksize = _int_field(meta, "blocksize")
    if not 16 <= blocksize <= 65536 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [16, 65536], got {blocksize}")
    if meta.get("dtype") not in _NAMED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NAMED_DTYPES)}, got {meta.get('dtype')!r}")
    nested = None
    if "nested_offset" in meta:
        offset = meta["nested_offset"]
        # bitsandbytes writes a float (the absmax vector's mean); an integer only where exact in float32
        exact_int = isinstance(offset, int) and not isinstance(offset, bool) and abs(offset) <= 1 << 24
        limit = torch.finfo(_NAMED_DTYPES[meta["dtype"]]).max  # an absmax of this dtype's values is below it
        if not (exact_int or isinstance(offset, float)) or not math.isfinite(offset) or abs(offset) > limit:
            raise ValueError(f"nested_offset must be a finite float within {meta['dtype']}'s range, got {offset!r}")
        nested_bs = _int_field(meta, "nested_blocksize", 256)
        if not 2 <= nested_bs <= 65536 or nested_bs & (nested_bs - 1):
            raise ValueError(f"nested_blocksize must be a power of two in [2, 65536], got {nested_bs}")
        nested = (nested_bs, float(offset))
    return tuple(shape), blocksize, _NAMED_DTYPES[meta["dtype"]], nested


def quant_state_key(state_dict: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    """The one ``<prefix>.quant_state.*`` key, None if there is none."""
    head = prefix + ".quant_state."
    keys = [k for k in state_dict if k.startswith(head)]
    if len(keys) > 1:
        raise ValueError(f"more than one quant_state entry for {prefix!r}: {keys}")
    return keys[0] if keys else None


def _need(state_dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"missing key {key!r} in the bitsandbytes state dict")
    t = state_dict[key]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{key!r} must be a tensor, got {type(t).__name__}")
    return t


def _check(ok: bool, key: str, what: str, t: torch.Tensor) -> None:
    if not ok:
        raise ValueError(f"{key!r}: expected {what}, got {t.dtype} {tuple(t.shape)}")


def from_bnb(state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
    """Read a bitsandbytes 4-bit weight (``Linear4bit`` / transformers) from its state dict.

    Args:
        state_dict: a mapping holding at least the keys listed in this module's docstring
            for ``prefix`` (other keys are ignored).
        prefix: the weight's key.

    Returns:
        A :class:`QuantizedTensor` whose tensors are those of ``state_dict`` (not copied;
        ``packed`` is a 1-D view of ``prefix``).

    Raises:
        ValueError: a key is missing, the JSON is unreadable, or a tensor's size or dtype
            does not fit the JSON's shape and blocksize; the message names the key.

    Example:
        >>> q = nf4lib.from_bnb(bnb_linear4bit.state_dict())
    """
    js_key = quant_state_key(state_dict, prefix)
    if js_key is None:
        raise ValueError(f"no '{prefix}.quant_state.bitsandbytes__nf4/fp4' entry in the state dict")
    raw = _need(state_dict, js_key)
    try:
        shape, blocksize, dtype, nested = parse_quant_state(read_quant_state(raw))
    except ValueError as e:
        raise ValueError(f"{js_key!r} is not a readable bitsandbytes quant state: {e}") from None
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed = _need(state_dict, prefix)
    if packed.dtype != torch.uint8:
        # bitsandbytes' quant_storage (uint8 by default; another dtype for FSDP) holds the
        # same bytes viewed as that dtype: read them back as bytes, their count checked below
        if packed.dtype not in _QUANT_STORAGE:
            raise ValueError(f"{prefix!r}: packed codes must be uint8 (or a bitsandbytes quant_storage dtype), got {packed.dtype}")
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1)
    _check(packed.numel() == (n + 1) // 2, prefix, f"{(n + 1) // 2} bytes for shape {shape}", packed)
    code = _need(state_dict, prefix + ".quant_map")
    _check(code.dim() == 1 and 1 <= code.numel() <= 16 and code.dtype == torch.float32, prefix + ".quant_map", "float32 (<=16,)", code)
    absmax = _need(state_dict, prefix + ".absmax")
    if nested is not None:
        nested_bs, offset = nested
        codes = absmax
        _check(codes.dtype == torch.uint8 and codes.numel() == n_blocks, prefix + ".absmax", f"uint8 ({n_blocks},)", codes)
        scales = _need(state_dict, prefix + ".nested_absmax")
        groups = -(-n_blocks // nested_bs)
        _check(scales.dtype == torch.float32 and scales.numel() == groups, prefix + ".nested_absmax", f"float32 ({groups},)", scales)
        dq_code = _need(state_dict, prefix + ".nested_quant_map")
        _check(dq_code.dtype == torch.float32 and dq_code.numel() == 256, prefix + ".nested_quant_map", "float32 (256,)", dq_code)
        offset = torch.tensor(offset, dtype=torch.float32, device=codes.device)
        stored = DoubleQuantized(codes.reshape(-1), scales.reshape(-1), offset, dq_code.reshape(-1), nested_bs)
    else:
        _check(absmax.dtype == torch.float32 and absmax.numel() == n_blocks, prefix + ".absmax", f"float32 ({n_blocks},)", absmax)
        stored = absmax.reshape(-1)
    q = QuantizedTensor(packed, stored, code, shape, dtype, blocksize)
    validate(q, repr(prefix))  # devices, and anything the checks above left out
    check_finite(q, repr(prefix))
    return q
