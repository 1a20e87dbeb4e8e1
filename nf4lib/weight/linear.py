"""Layer 5: ``NF4Linear``, a drop-in ``nn.Linear`` whose weight is stored in 4 bits.

Its weight is an ``nn.Parameter(requires_grad=False)`` holding an :class:`NF4Tensor`, so
``parameters()``, ``functional_call``, PEFT and distributed tools see it as a weight; its
state dict is bitsandbytes ``Linear4bit``'s, key for key and byte for byte, so a
converted model loads transformers + bitsandbytes 4-bit checkpoints and they load ours.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from ..core.codebooks import resolve_code
from ..core.double import dynamic_map
from ..formats.bnb import QUANT_STATE_SUFFIXES, from_bnb, quant_state_key
from ..core.spec import QuantSpec, settings
from ..ops.quantize import bits_per_parameter, quantize
from ..core.records import DoubleQuantized, QuantizedTensor
from .shard import copy_rows_into, local_bnb_entries, local_nf4, sharded_bnb_entries
from .tensor import COMPUTE_DTYPES, NF4Tensor, check_compute_dtype as _check_dtype, nf4_linear, same_layout

__all__ = ["NF4Linear"]


def check_compute_dtype(dtype) -> Optional[torch.dtype]:
    return None if dtype is None else _check_dtype(dtype)


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


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its family): a linear layer whose weight is stored
    transposed, ``(in_features, out_features)``; bitsandbytes converts it too. Recognised by
    name, so nf4lib never imports transformers for it."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and isinstance(getattr(module, "weight", None), torch.Tensor)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``(out_features, in_features)``, detached: a ``Conv1D``'s
    (stored transposed) as a transposed view, the layout it is quantized in."""
    return module.weight.detach().t() if is_conv1d(module) else module.weight.detach()


def code_name_of(code) -> Optional[str]:
    """The name a ``code`` argument gives (``"nf4"``...), None for a user codebook tensor."""
    return code.lower() if isinstance(code, str) else None


class NF4Linear(nn.Linear):
    """``y = x @ W.T + b`` with ``W`` held in 4 bits (``W ~= code[q] * absmax[block]``).

    A subclass of ``nn.Linear`` (so PEFT's LoRA and code that looks for linear layers
    accept it) that holds no full-precision weight. ``forward`` casts ``x`` to the
    compute dtype, calls :func:`nf4lib.quantized_linear`, and casts back.

    Parameters:
        ``weight``: ``nn.Parameter(requires_grad=False)`` holding an :class:`NF4Tensor`
        of shape ``(out_features, in_features)`` and dtype = the compute dtype; its
        4-bit parts are ``weight.packed``, ``weight.absmax``, ``weight.quant_map`` and,
        double-quantized, ``weight.nested_absmax``, ``weight.nested_quant_map``,
        ``weight.nested_offset``.
        ``bias``: ``(out,)`` in the original dtype, or None.

    State-dict keys (bitsandbytes ``Linear4bit``'s): ``weight`` (uint8 ``(ceil(n/2), 1)``),
    ``bias``, ``weight.absmax``, ``weight.quant_map``, [``weight.nested_absmax``,
    ``weight.nested_quant_map``], ``weight.quant_state.bitsandbytes__nf4`` (uint8 JSON;
    ``__fp4`` for FP4, ``nf4lib__<code>`` where bitsandbytes cannot read the weight).
    Each resolves by attribute (``layer.weight.absmax``, ``layer.weight.quant_state``).
    Loading adopts the checkpoint's blocksize, codebook and double quantization; its
    weight shape must be ``(out_features, in_features)``.

    ``.to(device)`` moves the 4-bit data; ``.to(dtype)``, ``.half()``, ``.bfloat16()``
    change the compute dtype (and the bias) and leave the 4-bit data as it is.

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(128, 64), double_quant=True)
        >>> layer(torch.randn(2, 128)).shape
        torch.Size([2, 64])
    """

    # True while the layer is an empty skeleton that a loader will give a full-precision
    # weight to quantize (transformers' quantize-on-load, ``nf4lib.hf``): its state dict
    # then holds the one key ``weight``, as ``nn.Linear``'s does.
    awaiting_weight: bool = False

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
        spec: Optional[QuantSpec] = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dtype not in COMPUTE_DTYPES[:3]:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        spec = settings(spec, "NF4Linear", blocksize=blocksize, code=code, double_quant=double_quant)
        check_compute_dtype(compute_dtype)
        self.in_features, self.out_features = in_features, out_features
        q = _empty_record(out_features, in_features, blocksize=spec.blocksize, code=spec.code, double_quant=spec.double_quant,
                          dtype=dtype, device=device)
        self._set_record(q, compute_dtype or dtype, code_name_of(spec.code))
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
        scale: str = "absmax",
        importance: Optional[torch.Tensor] = None,
        spec: Optional[QuantSpec] = None,
        layer_name: Optional[str] = None,
    ) -> "NF4Linear":
        """A new ``NF4Linear`` quantizing ``linear.weight`` (``linear`` is not modified).

        The settings (or ``spec``) and ``importance`` are :func:`nf4lib.quantize`'s
        (``importance``: ``(in_features,)`` or the weight's shape, say the inputs' mean
        squares). ``layer_name``, the layer's name in its model, is kept on the weight
        (``weight.layer_name``) to name it in errors. The bias is copied. On the meta device nothing is quantized: the result is an
        empty skeleton of the right layout, ready for ``load_state_dict(..., assign=True)``.
        """
        if isinstance(linear, nn.Linear) and not isinstance(linear, NF4Linear):
            w, in_f, out_f = linear.weight, linear.in_features, linear.out_features
        elif is_conv1d(linear):
            # transformers' Conv1D computes x @ W + b with W (in, out): the linear weight is W.T,
            # as bitsandbytes stores it
            w = linear.weight.t()
            out_f, in_f = w.shape
        else:
            raise TypeError(f"from_linear expects an nn.Linear (or transformers' Conv1D), got {type(linear).__name__}")
        # Built on meta (nothing allocated), then given the quantized weight: a skeleton
        # stays on meta, exactly as the constructor makes it.
        spec = settings(spec, "NF4Linear.from_linear", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
        layer = cls(in_f, out_f, linear.bias is not None, spec=spec, compute_dtype=compute_dtype, dtype=w.dtype, device="meta")
        if not w.is_meta:
            q = quantize(w.detach().contiguous(), spec=spec, importance=importance)
            layer._set_record(q, compute_dtype or w.dtype, code_name_of(spec.code))
        if layer_name is not None:
            layer.weight.layer_name = layer_name
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
        layer._set_record(q, compute_dtype or q.dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(q.device, copy=True), requires_grad=bias.requires_grad)
        return layer

    def _set_record(self, q: QuantizedTensor, compute_dtype: torch.dtype, name: Optional[str] = None) -> None:
        w = NF4Tensor.from_quantized(q, dtype=compute_dtype, code_name=name)
        self.weight = nn.Parameter(w, requires_grad=False)

    # ------------------------------------------------------------------ views
    def _nf4(self) -> NF4Tensor:
        """The NF4Tensor held here: the weight, or this rank's shard of it under FSDP2."""
        local = local_nf4(self.weight)
        return self.weight if local is None else local

    def _whole(self, what: str) -> NF4Tensor:
        if local_nf4(self.weight) is not None:
            raise RuntimeError(
                f"NF4Linear.{what}: this layer's weight is sharded by FSDP2 (this rank holds rows of it); "
                f"call .unshard() on its FSDP module first, or read layer.weight.to_local() for this rank's shard"
            )
        return self.weight

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as an immutable :class:`QuantizedTensor` record (sharing the tensors)."""
        return self._whole("quantized").quantized

    @property
    def compute_dtype(self) -> torch.dtype:
        """The matmul's dtype (the weight's ``dtype``); settable: the 4-bit bytes stay as they are."""
        return self.weight.dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        _check_dtype(dtype)  # None too: a weight always has a dtype
        self.weight.data = self.weight.data.to(dtype)  # a new compute dtype over the same bytes

    @property
    def weight_dtype(self) -> torch.dtype:
        """The source dtype: the dtype the weight was quantized from (the record's ``dtype``,
        written to the checkpoint); ``compute_dtype`` is the one the matmul runs in."""
        return self._nf4().qlayout.qdtype

    @property
    def blocksize(self) -> int:
        return self._nf4().qlayout.blocksize

    @property
    def code_name(self) -> str:
        return self._nf4().qlayout.code_name

    @property
    def double_quant(self) -> bool:
        return self._nf4().double_quant

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full ``(out_features, in_features)`` weight, in ``dtype`` (default: compute dtype)."""
        return self._whole("dequantize").dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            # nn.Linear raises here too; casting would silently truncate the result
            raise TypeError(f"NF4Linear expects a floating point input, got {getattr(x, 'dtype', type(x).__name__)}")
        w, bias = self.weight, self.bias
        cd = w.dtype  # the compute dtype
        if bias is not None and bias.dtype != cd:
            bias = bias.to(cd)
        y = nf4_linear(x if x.dtype == cd else x.to(cd), w, bias, cd)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        bits = bits_per_parameter(self._nf4().quantized)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"code={self.code_name}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"bits_per_weight={bits:.3f}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}"
        )

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order and bytes: weight (the packed codes, (ceil(n/2), 1)), bias,
        # then the quant state.
        w = self.weight
        if self.awaiting_weight:
            # an empty layer that transformers' loader will give a full-precision weight to
            # quantize (nf4lib.hf): it expects the one key "weight", as for nn.Linear
            destination[prefix + "weight"] = w
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            return
        if local_nf4(w) is not None:  # FSDP2: the sharded fields as DTensors of their shards
            parts = sharded_bnb_entries(w, prefix + "weight")
        else:
            parts = w._bnb_entries(prefix + "weight")
        destination[prefix + "weight"] = parts.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(parts)

    def _fqn_modifiers(self) -> dict:
        # torch.distributed.checkpoint.state_dict resolves each state-dict key by attribute
        # (weight.absmax, weight.quant_state.bitsandbytes__nf4). Under FSDP2 the weight is a
        # DTensor without those attributes: point its walk at the shard, which has them.
        return {"weight": "_shard_holder"} if local_nf4(self.weight) is not None else {}

    @property
    def _shard_holder(self):
        return types.SimpleNamespace(weight=local_nf4(self.weight))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        wkey, bkey = prefix + "weight", prefix + "bias"
        known = {wkey, bkey} | {f"{wkey}.{s}" for s in QUANT_STATE_SUFFIXES}
        if strict:  # as nn.Module does: keys under this prefix that name nothing here
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in known and not k.startswith(wkey + ".quant_state.")
            )
        if self.bias is not None and bkey not in state_dict:
            missing_keys.append(bkey)
        if wkey not in state_dict:
            missing_keys.append(wkey)
            q = None
        else:
            # Check everything before changing anything, so a failed load leaves the layer as it was.
            entries = {k: state_dict[k] for k in state_dict if k == wkey or k.startswith(wkey + ".")}
            try:
                if local_nf4(self.weight) is not None:
                    return self._load_shard(entries, wkey, bkey, state_dict)
                q = from_bnb(entries, wkey)
            except (ValueError, TypeError) as e:
                error_msgs.append(f"while loading {wkey!r}: {e}")
                return
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {wkey}: the checkpoint holds a quantized weight of shape {tuple(q.shape)}, "
                    f"this NF4Linear is ({self.out_features}, {self.in_features})"
                )
                return
        bias = state_dict.get(bkey) if self.bias is not None else None
        if bias is not None and tuple(bias.shape) != tuple(self.bias.shape):
            error_msgs.append(f"size mismatch for {bkey}: copying a param with shape {tuple(bias.shape)}, the current shape is {tuple(self.bias.shape)}")
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            if q is not None:
                self._load_record(q, assign)
            if bias is not None:
                if assign or self.bias.is_meta:
                    self.bias = nn.Parameter(bias.detach().to(self.weight.device), requires_grad=self.bias.requires_grad)
                else:
                    self.bias.copy_(bias)

    def _load_shard(self, entries, wkey, bkey, state_dict) -> None:
        """FSDP2: copy this rank's rows of a sharded or full checkpoint into the shard, in place."""
        js_key = quant_state_key(entries, wkey)
        if js_key is None:
            raise ValueError(f"no '{wkey}.quant_state.*' entry")
        q = from_bnb(local_bnb_entries(self.weight, entries, wkey, js_key), wkey)
        local = local_nf4(self.weight)
        new = NF4Tensor.from_quantized(q, dtype=local.dtype)
        if not same_layout(new, local):
            raise ValueError(
                f"the checkpoint's layout {new!r} differs from this sharded layer's {local!r}; a sharded layer "
                f"loads its own layout (convert the model with the checkpoint's settings before fully_shard)"
            )
        bias = state_dict.get(bkey) if self.bias is not None else None
        with torch.no_grad():
            local.copy_(new)
            if bias is not None:
                copy_rows_into(self.bias, bias)

    def _load_record(self, q: QuantizedTensor, assign: bool) -> None:
        w = self.weight
        if not assign and not w.is_meta:
            new = NF4Tensor.from_quantized(q, dtype=w.dtype)  # over the checkpoint's tensors
            if same_layout(new, w):
                w.copy_(new)  # in place (and across devices): the Parameter object (held by optimizers, FSDP) stays
                return
        # A new layout (blocksize, codebook, double quantization), a skeleton, or assign=True:
        # a new Parameter. Copy unless assigning, so the module never aliases the caller's tensors.
        device = q.device if w.is_meta else w.device
        self._set_record(q.to(device, copy=not assign), w.dtype)
