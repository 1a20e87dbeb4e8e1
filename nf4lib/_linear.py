"""Layer 5: ``NF4Linear``, a drop-in ``nn.Linear`` whose weight is stored in 4 bits.

Its state dict is bitsandbytes ``Linear4bit``'s, key for key and byte for byte, so a
converted model loads transformers + bitsandbytes 4-bit checkpoints and they load ours.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._codebooks import code_name, resolve_code
from ._double import dynamic_map
from ._interop import QUANT_STATE_SUFFIXES, from_bnb, to_bnb
from ._ops import quantized_linear
from ._quant import bits_per_parameter, check_blocksize, dequantize, quantize
from ._records import DoubleQuantized, QuantizedTensor

__all__ = ["NF4Linear"]

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Buffers holding the quantized weight. They keep their dtype through .to(dtype) / .half():
# only the compute dtype follows those.
_QUANT_BUFFERS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")


def check_compute_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is not None and dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _empty_record(out_f, in_f, *, blocksize, code, double_quant, dtype, device) -> QuantizedTensor:
    """A zero weight of the right layout (what a skeleton holds before loading)."""
    n = out_f * in_f
    n_blocks = -(-n // blocksize)
    levels = resolve_code(code).to(device)
    if double_quant:
        absmax = DoubleQuantized(
            torch.zeros(n_blocks, dtype=torch.uint8, device=device),
            torch.zeros(-(-n_blocks // 256), dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.float32, device=device),
            dynamic_map().to(device),
        )
    else:
        absmax = torch.zeros(n_blocks, dtype=torch.float32, device=device)
    packed = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device)
    return QuantizedTensor(packed, absmax, levels, (out_f, in_f), dtype, blocksize)


class NF4Linear(nn.Linear):
    """``y = x @ W.T + b`` with ``W`` held in 4 bits (``W ~= code[q] * absmax[block]``).

    A subclass of ``nn.Linear`` (so PEFT's LoRA and code that looks for linear layers
    accept it) that holds no full-precision weight. ``forward`` casts ``x`` to
    ``compute_dtype``, calls :func:`nf4lib.quantized_linear`, and casts back.

    Buffers (the frozen 4-bit weight; none is a parameter):
        ``weight`` uint8 ``(ceil(out*in/2), 1)``; ``absmax`` float32 ``(n_blocks,)`` or, with
        double quantization, uint8 codes; ``quant_map`` float32 ``(<=16,)``;
        ``nested_absmax`` float32, ``nested_quant_map`` float32 ``(256,)`` and
        ``nested_offset`` float32 ``()`` (None unless double-quantized).
    Parameter: ``bias`` ``(out,)`` in the original dtype, or None.

    State-dict keys (bitsandbytes ``Linear4bit``'s): ``weight``, ``weight.absmax``,
    ``weight.quant_map``, [``weight.nested_absmax``, ``weight.nested_quant_map``],
    ``weight.quant_state.bitsandbytes__nf4`` (uint8 JSON; ``__fp4`` for FP4,
    ``nf4lib__int4`` / ``nf4lib__custom`` for codebooks bitsandbytes lacks), ``bias``.
    Loading adopts the checkpoint's blocksize, codebook and double quantization; its
    weight shape must be ``(out_features, in_features)``.

    ``.to(device)`` moves the 4-bit data; ``.to(dtype)``, ``.half()``, ``.bfloat16()``
    change the compute dtype (and the bias) and leave the 4-bit data as it is.

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(128, 64), double_quant=True)
        >>> layer(torch.randn(2, 128)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        code="nf4",
        double_quant: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        check_blocksize(blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = check_compute_dtype(compute_dtype) or dtype
        q = _empty_record(out_features, in_features, blocksize=blocksize, code=code, double_quant=double_quant, dtype=dtype, device=device)
        for name in _QUANT_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self._set_record(q, code.lower() if isinstance(code, str) else None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        code="nf4",
        double_quant: bool = False,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> "NF4Linear":
        """A new ``NF4Linear`` quantizing ``linear.weight`` (``linear`` is not modified).

        The bias is copied. On the meta device nothing is quantized: the result is an
        empty skeleton of the right layout, ready for ``load_state_dict(..., assign=True)``.
        """
        if not isinstance(linear, nn.Linear) or isinstance(linear, NF4Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        # Built on meta (no buffers allocated), then given the quantized weight: a skeleton
        # stays on meta, exactly as the constructor makes it.
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            blocksize=blocksize, code=code, double_quant=double_quant,
            compute_dtype=compute_dtype, dtype=w.dtype, device="meta",
        )
        if not w.is_meta:
            layer._set_record(quantize(w.detach(), blocksize=blocksize, code=code, double_quant=double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: Optional[torch.Tensor] = None, *, compute_dtype=None) -> "NF4Linear":
        """A new ``NF4Linear`` holding ``q`` (a 2-D :class:`QuantizedTensor`, not copied); the bias is copied."""
        if not isinstance(q, QuantizedTensor) or len(q.shape) != 2:
            raise ValueError(f"from_quantized expects a 2-D QuantizedTensor, got {getattr(q, 'shape', type(q).__name__)}")
        out_f, in_f = q.shape
        layer = cls(in_f, out_f, bias is not None, blocksize=q.blocksize, compute_dtype=compute_dtype, dtype=q.dtype, device="meta")
        layer._set_record(q)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(q.device, copy=True), requires_grad=bias.requires_grad)
        return layer

    def _set_record(self, q: QuantizedTensor, name: Optional[str] = None) -> None:
        self.weight = q.packed.reshape(-1, 1)
        if isinstance(q.absmax, DoubleQuantized):
            d = q.absmax
            self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset = d.codes, d.scales, d.code, d.offset
            self.nested_blocksize = d.blocksize
        else:
            self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset = q.absmax, None, None, None
            self.nested_blocksize = 256
        self.quant_map = q.code
        # The codebook's name, kept so a meta-device skeleton can still name it.
        self.code_name = name if name is not None else (None if q.code.is_meta else code_name(q.code)) or "custom"
        self.blocksize = q.blocksize
        self.weight_dtype = q.dtype

    # ------------------------------------------------------------------ views
    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as an immutable :class:`QuantizedTensor` record (sharing the buffers)."""
        absmax = self.absmax
        if self.nested_absmax is not None:
            absmax = DoubleQuantized(self.absmax, self.nested_absmax, self.nested_offset, self.nested_quant_map, self.nested_blocksize)
        return QuantizedTensor(
            self.weight.reshape(-1), absmax, self.quant_map, (self.out_features, self.in_features), self.weight_dtype, self.blocksize
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full ``(out_features, in_features)`` weight, in ``dtype`` (default: compute dtype)."""
        return dequantize(self.quantized, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(cd)
        return quantized_linear(x.to(cd), self.quantized, bias).to(x.dtype)

    def extra_repr(self) -> str:
        bits = bits_per_parameter(self.quantized)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"code={self.code_name}, blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}, "
            f"bits_per_weight={bits:.3f}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}"
        )

    # ------------------------------------------------------------------ device / dtype
    def _apply(self, fn, recurse=True):
        # Find where fn sends a float64 tensor: its device is the move, a changed dtype is
        # the new compute dtype. The 4-bit buffers only ever move.
        probe = fn(torch.empty(0, dtype=torch.float64, device=self.weight.device))
        held = {k: self._buffers.pop(k) for k in _QUANT_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in held.items():
                if t is not None and t.device != probe.device:
                    t = torch.empty_like(t, device=probe.device) if t.is_meta else t.to(probe.device)
                self._buffers[k] = t
        if probe.dtype != torch.float64 and probe.dtype in _COMPUTE_DTYPES:
            self.compute_dtype = probe.dtype
        return self

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the quant state. The quant buffers are
        # non-persistent, so the base class writes only the bias.
        parts = to_bnb(self.quantized, prefix + "weight", code_name=self.code_name)
        destination[prefix + "weight"] = parts.pop(prefix + "weight")
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        own = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in own}
        if wkey not in own:
            missing_keys.append(wkey)
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            return
        known = {wkey} | {f"{wkey}.{s}" for s in QUANT_STATE_SUFFIXES}
        unexpected_keys.extend(k for k in own if k not in known and not k.startswith(wkey + ".quant_state."))
        # Check the quantized weight before touching anything, so a failed load changes nothing here.
        try:
            q = from_bnb(own, wkey)
        except (ValueError, TypeError) as e:
            error_msgs.append(f"while loading {wkey!r}: {e}")
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"size mismatch for {wkey}: the checkpoint holds a quantized weight of shape {tuple(q.shape)}, "
                f"this NF4Linear is ({self.out_features}, {self.in_features})"
            )
            return
        n_errors = len(error_msgs)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if len(error_msgs) > n_errors:
            return
        device = self.weight.device
        assign = local_metadata.get("assign_to_params_buffers", False)
        if device.type == "meta":
            device = q.device  # a skeleton takes the checkpoint's tensors where they are
        # Copy (as load_state_dict does) unless assigning: the module never aliases the caller's tensors.
        self._set_record(q.to(device, copy=not assign))

