"""Layer 5: ``NF4Tensor``, the 4-bit weight as a tensor PyTorch can see as a weight.

A traceable wrapper tensor subclass: to PyTorch it is an ``(out_features, in_features)``
tensor of the compute dtype (what ``F.linear`` multiplies in); inside it holds the
fields of a :class:`QuantizedTensor` record under bitsandbytes' names::

    packed            uint8 (ceil(n/2),)   two 4-bit codes per byte
    absmax            float32 (n_blocks,)  or uint8 8-bit codes when double-quantized
    quant_map         float32 (<=16,)      the codebook
    nested_absmax     float32 (n_groups,)  } double quantization only
    nested_quant_map  float32 (256,)       }
    nested_offset     float32 ()           }

    w[i] ~= quant_map[nibble(i)] * absmax[i // blocksize]

What each operation does:

* ``F.linear(x, w, b)``, ``x @ w.T``, ``torch.mm``/``addmm`` with ``w.T`` run
  ``torch.ops.nf4lib.quantized_linear``: the weight is never materialised.
* ``detach``, ``clone``, ``.to(device)`` (4 bits stay 4 bits), ``.to(dtype)`` (changes
  only the compute dtype), ``copy_`` (from an NF4Tensor of the same layout, or from a
  dense tensor, which is quantized with this tensor's settings), ``param.data = ...``
  (the same two cases; PEFT writes merged weights so), ``empty_like``,
  ``pin_memory``, ``t``/``transpose``, pickling, ``torch.save``, ``copy.deepcopy``.
* FSDP2: ``fsdp_pre_all_gather``/``fsdp_post_all_gather`` and the ops it shards with:
  ``torch.chunk``/``split`` and ``narrow``/``slice`` by whole quantization blocks,
  ``new_zeros``, ``view``, ``as_strided`` (identity), ``copy_`` (see ``shard``).
* Any other op reads the weight: the NF4 arguments are dequantized and the op runs on
  the dense weight, returning a plain tensor. An in-place op on the weight itself
  (``normal_`` in a model's ``init_weights``) runs on the dense weight and quantizes
  the result back into this tensor.

``__tensor_flatten__`` / ``__tensor_unflatten__`` let torch.compile, AOTAutograd and
torch.export trace it.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..core.codebooks import code_name as _code_name
from ..formats.bnb import to_bnb
from ..ops.library import check_linear_input, op_args
from ..backends.cpu import kernels as cpu_kernels
from ..ops.linear import input_grad, linear_parts
from ..core.checks import check_finite, validate
from ..ops.quantize import bits_per_parameter, dequantize, quantize
from ..core.records import QuantizedTensor, scales_from_parts
from .shard import ShardableMixin, check_shardable, on_blocks, row_slice, zeros_inner
from .. import backends  # noqa: F401  (an NF4 weight computes with the registered kernels, however it was loaded)

__all__ = ["NF4Tensor"]

aten = torch.ops.aten
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NESTED = ("nested_absmax", "nested_quant_map", "nested_offset")
_INNER = ("packed", "absmax", "quant_map") + _NESTED


class Layout(NamedTuple):
    """The static part of an NF4Tensor (its ``__tensor_flatten__`` context)."""

    blocksize: int
    nested_blocksize: Optional[int]  # None: plain float32 absmax
    qdtype: torch.dtype  # the dtype the record was quantized from (bitsandbytes' "dtype")
    code_name: str  # "nf4", "fp4", "int4" or "custom"
    transposed: bool  # a ``w.t()`` view: outer shape (in, out)


class _QuantStateKeys:
    """``weight.quant_state.<family>__<type>``: the JSON entry of the state dict, reachable by
    attribute as bitsandbytes' Params4bit allows, so tools that walk state-dict keys through
    attributes (``torch.distributed.checkpoint.state_dict``) find every key."""

    def __init__(self, key: str, value: torch.Tensor):
        setattr(self, key, value)


class NF4Tensor(ShardableMixin, torch.Tensor):
    """A 4-bit NF4 (or FP4 / INT4 / custom codebook) weight as a ``torch.Tensor``.

    Build one with :meth:`from_quantized` (or ``nf4lib.quantize`` then that); read the
    record back with :attr:`quantized`, the dense weight with :meth:`dequantize`.

    Example:
        >>> w = NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(64, 128)))
        >>> w.shape, w.dtype
        (torch.Size([64, 128]), torch.float32)
        >>> F.linear(torch.randn(2, 128), w).shape   # runs nf4lib.quantized_linear
        torch.Size([2, 64])
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_quant_map: Optional[torch.Tensor]
    nested_offset: Optional[torch.Tensor]
    qlayout: Layout
    # the name of the layer holding this weight in its model, to name it in errors (set by
    # ``NF4Linear.from_linear(layer_name=...)``, which ``convert`` and ``nf4lib.hf`` call)
    layer_name: Optional[str] = None

    @staticmethod
    def __new__(cls, inner: dict, layout: Layout, shape, dtype, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=inner["packed"].device, requires_grad=requires_grad
        )

    def __init__(self, inner: dict, layout: Layout, shape, dtype, requires_grad: bool = False):
        for name in _INNER:
            setattr(self, name, inner.get(name))
        self.qlayout = layout

    # ------------------------------------------------------------------ record <-> tensor
    @classmethod
    def from_quantized(cls, q: QuantizedTensor, *, dtype: Optional[torch.dtype] = None, code_name: Optional[str] = None) -> "NF4Tensor":
        """An NF4Tensor over a 2-D record's tensors (shared, not copied).

        Args:
            q: a 2-D :class:`QuantizedTensor` ``(out_features, in_features)``.
            dtype: the compute dtype (the tensor's ``dtype``); default ``q.dtype``.
            code_name: the codebook's name when ``q.code`` cannot be read (meta device).
        """
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"from_quantized expects a QuantizedTensor, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"an NF4Tensor is a 2-D weight (out_features, in_features), got shape {q.shape}")
        dtype = q.dtype if dtype is None else dtype
        check_compute_dtype(dtype, "dtype")
        if not q.packed.is_meta:
            validate(q, "NF4Tensor")
        parts = op_args(q)
        inner = {k: parts.get(k) for k in _INNER}
        if code_name is None:
            code_name = "custom" if q.code.is_meta else (_code_name(q.code) or "custom")
        layout = Layout(q.blocksize, parts.get("nested_blocksize"), q.dtype, code_name, False)
        return cls(inner, layout, q.shape, dtype)

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a :class:`QuantizedTensor` record (tensors shared), in ``(out, in)`` order."""
        lay = self.qlayout
        scales = scales_from_parts(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset, lay.nested_blocksize)
        shape = tuple(self.shape[::-1]) if lay.transposed else tuple(self.shape)
        return QuantizedTensor(self.packed, scales, self.quant_map, shape, lay.qdtype, lay.blocksize)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight as a plain tensor, in ``dtype`` (default: this tensor's dtype)."""
        w = dequantize(self.quantized, dtype or self.dtype)
        return w.t() if self.qlayout.transposed else w

    def element_size(self) -> float:
        """Stored bytes per weight: the packed codes and the per-block scales, 0.5625 at
        blocksize 64 (4.5 bits), ~0.516 with double quantization; a float, since a 4-bit
        weight has no whole number of bytes. ``numel() * element_size()`` is then the bytes
        this weight holds, which is what memory accounting (``get_memory_footprint``,
        transformers' device-map planning) multiplies; ``dtype`` stays the compute dtype and
        ``shape`` the weight's."""
        return bits_per_parameter(self.quantized) / 8

    @property
    def blocksize(self) -> int:
        return self.qlayout.blocksize

    @property
    def double_quant(self) -> bool:
        return self.qlayout.nested_blocksize is not None

    @property
    def quant_state(self) -> _QuantStateKeys:
        """The ``quant_state.<family>__<type>`` state-dict entry, by attribute."""
        ((key, value),) = [(k, v) for k, v in self._bnb_entries("w").items() if k.startswith("w.quant_state.")]
        return _QuantStateKeys(key[len("w.quant_state."):], value)

    def _bnb_entries(self, prefix: str) -> dict:
        return to_bnb(self.quantized, prefix, code_name=self.qlayout.code_name)

    def _inner(self) -> dict:
        return {k: getattr(self, k) for k in _INNER if getattr(self, k) is not None}

    def _rebuild(self, fn, *, dtype=None, layout=None, shape=None) -> "NF4Tensor":
        """A new NF4Tensor whose inner tensors are ``fn(t)`` of this one's."""
        inner = {k: fn(t) for k, t in self._inner().items()}
        lay = layout or self.qlayout
        if shape is None:
            shape = self.shape if lay.transposed == self.qlayout.transposed else self.shape[::-1]
        return NF4Tensor(inner, lay, shape, dtype or self.dtype)

    # ------------------------------------------------------------------ .data
    # ``param.data = new`` swaps only the C++ tensor: the 4-bit fields live on this Python
    # object and would stay the old ones, so the assignment would silently do nothing.
    # PEFT writes merged weights this way (DoRA, IA3, safe_merge, OLoRA, PiSSA).
    @property
    def data(self) -> "NF4Tensor":
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new) -> None:
        """Take ``new``'s contents: another NF4Tensor's fields as they are, or a dense
        float tensor of this shape quantized with this weight's settings (as ``copy_``
        does, and as bitsandbytes re-quantizes a merged weight). The old fields are not
        written to, so earlier aliases of ``.data`` keep their values."""
        if isinstance(new, NF4Tensor):
            torch.Tensor.data.__set__(self, new)
            src = new
        else:
            if not isinstance(new, torch.Tensor) or not new.is_floating_point():
                raise TypeError(f"an NF4 weight's .data takes an NF4Tensor or float values, got "
                                f"{type(new).__name__} {getattr(new, 'dtype', '')}")
            if new.shape != self.shape:
                raise ValueError(f"cannot set .data of an NF4 weight of shape {tuple(self.shape)} to shape {tuple(new.shape)}")
            src = self._rebuild(torch.empty_like)
            _store_dense(src, new.to(self.device))
        for name in _INNER:
            setattr(self, name, getattr(src, name))
        self.qlayout = src.qlayout

    # ------------------------------------------------------------------ tracing
    def __tensor_flatten__(self):
        return list(self._inner()), (self.qlayout, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, context, outer_size, outer_stride):
        layout, dtype = context
        return NF4Tensor(inner_tensors, layout, outer_size, dtype)

    def __repr__(self):
        lay = self.qlayout
        t = ", transposed" if lay.transposed else ""
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, code={lay.code_name}, "
            f"blocksize={lay.blocksize}, double_quant={self.double_quant}{t})"
        )

    def _stable_hash_for_caching(self) -> str:
        # AOTAutograd's cache key: everything static about this tensor, none of its data
        inner = [(k, tuple(t.shape), str(t.dtype), t.device.type) for k, t in self._inner().items()]
        text = repr((tuple(self.qlayout), tuple(self.shape), str(self.dtype), inner))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def __reduce_ex__(self, protocol):
        # a Parameter stays a Parameter (torch.save(model), copy by pickling, torch.export)
        is_param = bool(getattr(self, "_is_param", False))
        return (_rebuild_nf4, (self._inner(), tuple(self.qlayout), tuple(self.shape), self.dtype, self.requires_grad, is_param))

    def requires_grad_(self, requires_grad: bool = True) -> "NF4Tensor":
        if requires_grad:
            warnings.warn(
                "an NF4 weight is frozen: quantized_linear gives it no gradient, so its .grad stays None. "
                "Train adapters on top (LoRA: peft, or nf4lib.prepare_qat for quantization-aware training)",
                stacklevel=2,
            )
        return super().requires_grad_(requires_grad)

    # ------------------------------------------------------------------ dispatch
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, NF4Tensor) and not w.qlayout.transposed and not isinstance(x, NF4Tensor):
                return nf4_linear(x, w, b)
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            x, w = args
            if isinstance(w, NF4Tensor) and w.qlayout.transposed and not isinstance(x, NF4Tensor) and x.dim() >= 1:
                if func not in _MM or x.dim() == 2:
                    return nf4_linear(x, w.t(), None)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            # dist.broadcast / all_reduce / send on the wrapper would move (or reduce) a dense
            # stand-in, never the 4-bit bytes: refuse rather than do nothing or write garbage
            raise TypeError(
                f"{func.__name__}: torch.distributed collectives do not run on an NF4 weight itself; run them on "
                f"its stored tensors (w.packed, w.absmax and the nested_* parts, byte-wise), or shard the model with "
                f"FSDP2 (fully_shard), which moves those bytes; see nf4lib.distributed.load_from_rank0 for loading"
            )
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return _dense_fallback(func, args, kwargs)


def _rebuild_nf4(inner, layout, shape, dtype, requires_grad, is_param=False):
    """Unpickle an NF4Tensor. A file is untrusted input (``torch.load(weights_only=True)``
    exists to open strangers' checkpoints): every field is checked as ``validate`` checks a
    record, and the stored scales must be finite, before anything can reach a kernel.

    Raises:
        pickle.UnpicklingError: the fields do not describe a valid NF4 weight (the message
            says which); ``torch.load`` reports it as a failed load.
    """
    try:
        t = _checked_rebuild(inner, layout, shape, dtype, requires_grad)
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"not a valid NF4 weight: {e}") from None
    return torch.nn.Parameter(t, requires_grad=requires_grad) if is_param is True else t


def _checked_rebuild(inner, layout, shape, dtype, requires_grad) -> "NF4Tensor":
    if not isinstance(inner, dict) or not set(inner) <= set(_INNER) or not {"packed", "absmax", "quant_map"} <= set(inner):
        raise ValueError(f"its tensors must be a dict of {_INNER[:3]} (and the nested parts), got {type(inner).__name__} "
                         f"{sorted(inner) if isinstance(inner, dict) else ''}")
    if any(not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter) for t in inner.values()):
        raise TypeError("every stored part must be a plain tensor")
    if not isinstance(layout, (tuple, list)) or len(layout) != len(Layout._fields):
        raise ValueError(f"layout must have {len(Layout._fields)} fields {Layout._fields}, got {layout!r}")
    lay = Layout(*layout)
    if not isinstance(lay.code_name, str) or not isinstance(lay.transposed, bool):
        raise TypeError(f"layout's code_name must be a str and transposed a bool, got {lay.code_name!r}, {lay.transposed!r}")
    if (lay.nested_blocksize is None) != ("nested_absmax" not in inner):
        raise ValueError("the nested blocksize and the nested tensors must come together")
    if isinstance(requires_grad, bool) is False:
        raise TypeError(f"requires_grad must be a bool, got {requires_grad!r}")
    check_compute_dtype(dtype, "dtype")
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"an NF4 weight is 2-D, got shape {shape!r}")
    q_shape = tuple(shape)[::-1] if lay.transposed else tuple(shape)
    scales = scales_from_parts(inner["absmax"], inner.get("nested_absmax"), inner.get("nested_quant_map"),
                               inner.get("nested_offset"), lay.nested_blocksize)
    q = QuantizedTensor(inner["packed"], scales, inner["quant_map"], q_shape, lay.qdtype, lay.blocksize)
    validate(q, "NF4 weight")
    check_finite(q, "NF4 weight")
    t = NF4Tensor(inner, lay, tuple(shape), dtype)
    return torch.Tensor.requires_grad_(t, True) if requires_grad else t


# Saved files name the rebuild function by module path: it is pickled as
# ``nf4lib._tensor._rebuild_nf4``, a name kept stable however the package is laid out.
_rebuild_nf4.__module__ = "nf4lib._tensor"
# torch.load(weights_only=True), the default, may rebuild NF4 weights: the rebuild checks
# the fields it is given and only wraps the tensors the file holds.
torch.serialization.add_safe_globals([_rebuild_nf4])


def check_compute_dtype(dtype, what: str = "compute_dtype") -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{what} must be torch.float32, torch.float16, torch.bfloat16 or torch.float64, got {dtype!r}")
    return dtype


def nf4_linear(x: torch.Tensor, w: NF4Tensor, bias: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for an (untransposed) NF4Tensor ``w``, as ``nn.Linear`` would:
    ``x`` must be floating point and of ``w.dtype`` (the compute dtype; ``dtype``, when the
    caller has read it already)."""
    if type(x) is torch.Tensor and isinstance(w, NF4Tensor) and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
        y = _planned_linear(x, w, bias, w.dtype if dtype is None else dtype)
        if y is not None:
            return y
    check_linear_input(x, w.shape[1], w.device, "F.linear with an NF4 weight")
    if x.dtype != w.dtype:
        raise RuntimeError(
            f"F.linear with an NF4 weight: x is {x.dtype} but the weight computes in {w.dtype}; "
            f"cast x (x.to({w.dtype})) or the weight's compute dtype (w.to({x.dtype}))"
        )
    return linear_parts(x, op_args(w.quantized), bias)


# ---- the CPU fast path of small calls. A frozen weight's record is checked, and its native
# GEMV arguments prepared, once; each call checks only x and the bias (a 256x256 layer at
# batch 1 on a 2-core AVX2 EPYC: ~125 us a call through the op, see benchmarks/bench_linear.py).
class _PlanSlot:
    """Where a weight keeps its GEMV plan (in its ``__dict__``): copies and pickles of the
    weight start without one (a plan holds raw pointers into this weight's buffers)."""

    __slots__ = ("key", "plan")

    def __init__(self, key=None, plan=None):
        self.key, self.plan = key, plan

    def __deepcopy__(self, memo):
        return _PlanSlot()

    def __reduce__(self):
        return (_PlanSlot, ())


def _plan_key(w: NF4Tensor) -> tuple:
    # the buffers, their version counters and addresses: an in-place write (copy_, resize_,
    # a load), a new buffer, or new memory under the same tensor makes a new plan. The
    # address matters: FSDP2 frees an unsharded weight's memory between forwards
    # (storage().resize_(0)) and gathers it again into new memory, which no version counter
    # sees; a plan's pointers into the old memory would read freed memory
    if w.nested_absmax is None:
        return (id(w.packed), w.packed._version, w.packed.data_ptr(), id(w.absmax), w.absmax._version, w.absmax.data_ptr(),
                id(w.quant_map), w.quant_map._version, w.quant_map.data_ptr())
    return tuple((id(t), t._version, t.data_ptr()) for t in (w.packed, w.absmax, w.quant_map, w.nested_absmax,
                                                              w.nested_quant_map, w.nested_offset))


def _gemv_plan(w: NF4Tensor):
    key = _plan_key(w)
    slot = w.__dict__.get("_gemv_plan")
    if slot is not None and slot.key == key:
        return slot.plan
    plan = None
    if w.packed.device.type == "cpu" and not w.qlayout.transposed and not w.packed.is_meta:
        q = w.quantized
        validate(q, "NF4 weight")
        plan = cpu_kernels.gemv_plan(q)
    w.__dict__["_gemv_plan"] = _PlanSlot(key, plan)
    return plan


def _planned_linear(x: torch.Tensor, w: NF4Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype):
    """The GEMV through the weight's plan, or None where the op must run (a GPU, another
    dtype, more rows, a bias subclass, a weight the native kernels cannot take)."""
    if x.dtype != dtype or (bias is not None and type(bias) not in (torch.Tensor, torch.nn.Parameter)):
        return None
    plan = _gemv_plan(w)
    if plan is None:
        return None
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return cpu_kernels.planned_linear(x, plan, bias)
    if not x.requires_grad:  # a trainable bias alone: y = (x @ W.T) + b, as the kernel adds it, in float32
        y = cpu_kernels.planned_linear(x, plan, None, float32=True)
        return None if y is None else (y + bias.float()).to(x.dtype)
    if cpu_kernels.planned_linear_fits(x, plan, bias):
        return _apply_planned(x, bias, w, plan)
    return None


class _PlannedLinear(torch.autograd.Function):
    """The planned GEMV with the op's gradients (``dL/dx = dL/dy @ W``, ``dL/db`` summed)."""

    @staticmethod
    def forward(ctx, x, bias, w, plan):
        ctx.w, ctx.x_dtype, ctx.has_bias = w, x.dtype, bias is not None
        return cpu_kernels.planned_linear(x, plan, bias, checked=True)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad, op_args(ctx.w.quantized)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


# autograd's C entry for this old-style Function (forward takes ctx): Function.apply's Python
# wrapper only adds torch.func support, and this path runs outside torch.func transforms;
# skipping it saves ~12 us of a ~60 us small call
try:
    _apply_planned = torch._C._FunctionBase.__dict__["apply"].__get__(None, _PlannedLinear)
except (AttributeError, KeyError, TypeError):  # another PyTorch layout: the public wrapper
    _apply_planned = _PlannedLinear.apply


_MM = {torch.mm, torch.Tensor.mm}
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__} | _MM


# ----------------------------------------------------------------------------- handlers
_HANDLERS = {}


def _handles(*ops):
    def wrap(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return wrap


@_handles(aten.detach.default, aten.alias.default)
def _alias(func, args, kwargs):
    return args[0]._rebuild(lambda t: func(t))


@_handles(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._rebuild(lambda t: t.clone())


@_handles(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    w = args[0]
    dtype = kwargs.get("dtype") or w.dtype
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"an NF4 weight computes in a floating point dtype (fp32, fp16, bf16, fp64), not {dtype}; "
            f"use .dequantize({dtype}) for a dense copy"
        )
    device = kwargs.get("device") or w.device
    non_blocking = kwargs.get("non_blocking", False)

    def move(t):
        t = t.to(device, non_blocking=non_blocking, copy=True)
        return t.pin_memory() if kwargs.get("pin_memory") else t

    return w._rebuild(move, dtype=dtype)


@_handles(aten.empty_like.default)
def _empty_like(func, args, kwargs):
    w = args[0]
    device = kwargs.get("device") or w.device
    dtype = kwargs.get("dtype") or w.dtype
    if dtype not in COMPUTE_DTYPES:
        return NotImplemented  # a plain empty tensor of that dtype
    pin = kwargs.get("pin_memory") or False
    return w._rebuild(lambda t: torch.empty_like(t, device=device, pin_memory=pin), dtype=dtype)


@_handles(aten._pin_memory.default)
def _pin(func, args, kwargs):
    return args[0]._rebuild(lambda t: t.pin_memory())


@_handles(aten.is_pinned.default)
def _is_pinned(func, args, kwargs):
    return args[0].packed.is_pinned()


# ---- row shards (FSDP2 shards with chunk, pads with new_zeros + narrow().copy_, views with view/as_strided)
def _rows_of(w) -> bool:
    return isinstance(w, NF4Tensor) and w.dim() == 2 and not w.qlayout.transposed


def _row_piece(w, r0, r1):
    return NF4Tensor(row_slice(w, r0, r1), w.qlayout, (r1 - r0, w.shape[1]), w.dtype)


@_handles(aten.split.Tensor, aten.split_with_sizes.default)
def _split(func, args, kwargs):
    w, sizes, dim = args[0], args[1], (args[2] if len(args) > 2 else kwargs.get("dim", 0))
    if not _rows_of(w) or dim % 2:
        return NotImplemented
    if func is aten.split.Tensor:  # torch.chunk / torch.split(w, n): equal shards, as FSDP2 makes them
        check_shardable(w, sizes, "torch.chunk/split")
        sizes = [sizes] * (w.shape[0] // sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if not all(on_blocks(w, r, r + n) for r, n in zip(starts, sizes)):
        return NotImplemented  # rows that cut through blocks: dense pieces
    return [_row_piece(w, r, r + n) for r, n in zip(starts, sizes)]


@_handles(aten.slice.Tensor)
def _slice(func, args, kwargs):
    w, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    if not _rows_of(w) or dim % 2 or step != 1:
        return NotImplemented
    r0, r1, _ = slice(start, end).indices(w.shape[0])
    if (r0, r1) == (0, w.shape[0]):
        return w._rebuild(lambda t: t)  # narrow(0, 0, out): the same weight
    r1 = max(r0, r1)
    # rows that cut through a block have no 4-bit form of their own: a dense slice then
    return _row_piece(w, r0, r1) if on_blocks(w, r0, r1) else NotImplemented


@_handles(aten.new_zeros.default, aten.new_empty.default)
def _new_zeros(func, args, kwargs):
    w, size = args[0], list(args[1])
    dtype = kwargs.get("dtype") or w.dtype
    if not _rows_of(w) or len(size) != 2 or size[1] != w.shape[1] or dtype not in COMPUTE_DTYPES:
        return NotImplemented  # a plain tensor of that shape
    return NF4Tensor(zeros_inner(w, size[0]), w.qlayout, size, dtype)


@_handles(aten.view.default, aten._unsafe_view.default)
def _view(func, args, kwargs):
    w, size = args[0], list(args[1])
    if w.qlayout.transposed:
        return NotImplemented
    # a row-major 4-bit weight is the same bytes in any shape of the same size
    if -1 in size:
        known = -torch.Size(size).numel()
        size[size.index(-1)] = w.numel() // known if known else 0
    if torch.Size(size).numel() != w.numel():
        raise RuntimeError(f"view: shape {tuple(args[1])} is invalid for an NF4 weight of {w.numel()} elements")
    return w._rebuild(lambda t: t, shape=size)


@_handles(aten.as_strided.default)
def _as_strided(func, args, kwargs):
    w, size, stride = args[0], tuple(args[1]), tuple(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset") or 0
    if size == tuple(w.shape) and stride == tuple(w.stride()) and not offset:
        return w._rebuild(lambda t: t)
    raise RuntimeError(f"as_strided{size, stride, offset} of an NF4 weight of shape {tuple(w.shape)}: only the identity view exists")


@_handles(aten.t.default, aten.transpose.int, aten.permute.default)
def _transpose(func, args, kwargs):
    w = args[0]
    if func is aten.transpose.int and {d % 2 for d in args[1:3]} != {0, 1}:
        return w._rebuild(lambda t: t)  # transpose(0, 0): the same tensor
    if func is aten.permute.default and [d % 2 for d in args[1]] == [0, 1]:
        return w._rebuild(lambda t: t)
    return w._rebuild(lambda t: t, layout=w.qlayout._replace(transposed=not w.qlayout.transposed))


def _weight_call(x, wt, bias):
    """``x @ wt + bias`` where ``wt`` is a transposed NF4Tensor: the op, below autograd."""
    # the record is always in (out, in) order, whichever way the tensor is viewed
    return torch.ops.nf4lib.quantized_linear(x, bias=bias, **op_args(wt.quantized))


@_handles(aten.mm.default)
def _mm(func, args, kwargs):
    x, wt = args
    if isinstance(wt, NF4Tensor) and wt.qlayout.transposed and not isinstance(x, NF4Tensor) and x.dtype == wt.dtype:
        return _weight_call(x, wt, None)
    return NotImplemented


@_handles(aten.addmm.default)
def _addmm(func, args, kwargs):
    bias, x, wt = args
    plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and bias.dim() == 1
    if plain and isinstance(wt, NF4Tensor) and wt.qlayout.transposed and not isinstance(x, NF4Tensor) and x.dtype == wt.dtype:
        return _weight_call(x, wt, bias)
    return NotImplemented


@_handles(aten.copy_.default)
def _copy(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(dst, NF4Tensor):
        return NotImplemented  # reading an NF4 source: the dense fallback dequantizes it
    if not src.is_floating_point():
        # e.g. 4-bit bytes: quantizing them as values would silently corrupt the weight
        raise TypeError(
            f"copy_: an NF4 weight takes float values (which it quantizes) or another NF4Tensor, got {src.dtype}; "
            f"load bitsandbytes bytes with load_state_dict"
        )
    if dst.shape != src.shape:
        raise RuntimeError(f"copy_: cannot copy a tensor of shape {tuple(src.shape)} into an NF4 weight of shape {tuple(dst.shape)}")
    if isinstance(src, NF4Tensor):
        if src.qlayout.transposed != dst.qlayout.transposed:
            src = src.dequantize()  # a transposed source: requantize its values
        elif _layout_key(src) != _layout_key(dst):
            raise ValueError(
                f"copy_: the NF4 source has layout {_describe(src)}, the destination {_describe(dst)}; "
                f"copy between NF4 weights needs one layout (or copy a dense tensor, which is quantized)"
            )
        else:
            for k, t in dst._inner().items():
                t.copy_(getattr(src, k))
            return dst
    _store_dense(dst, src)
    return dst


def _layout_key(w: NF4Tensor):
    lay = w.qlayout
    return (lay.blocksize, lay.nested_blocksize, lay.transposed, tuple((k, t.shape) for k, t in w._inner().items()))


def same_layout(a: NF4Tensor, b: NF4Tensor) -> bool:
    """True when ``b.copy_(a)`` keeps everything about ``b`` but its values (codebook name
    and source dtype included, which the state dict records)."""
    return a.qlayout == b.qlayout and _layout_key(a) == _layout_key(b)


def _describe(w: NF4Tensor) -> str:
    lay = w.qlayout
    return f"(code={lay.code_name}, blocksize={lay.blocksize}, double_quant={w.double_quant}, {w.quant_map.numel()} levels)"


def _store_dense(dst: NF4Tensor, dense: torch.Tensor) -> None:
    """Quantize ``dense`` with ``dst``'s settings and write the result into ``dst``'s tensors."""
    lay = dst.qlayout
    values = dense.t() if lay.transposed else dense
    code = lay.code_name if lay.code_name in ("nf4", "fp4", "int4") else dst.quant_map
    q = quantize(values.detach().to(lay.qdtype).contiguous(), blocksize=lay.blocksize, code=code, double_quant=dst.double_quant)
    new = {"packed": q.packed, "quant_map": q.code, **q.scales.op_parts()}  # any shape: views of the weight too
    for k, t in dst._inner().items():
        t.copy_(new[k])


def _unwrap_dense(x):
    return x.dequantize() if isinstance(x, NF4Tensor) else x


def _dense_fallback(func, args, kwargs):
    mutated = _mutated_nf4(func, args, kwargs)
    d_args, d_kwargs = tree_map(_unwrap_dense, (args, kwargs))
    out = func(*d_args, **d_kwargs)
    if not mutated:
        return out
    # An in-place op on the weight ran on its dense copy: quantize the new values back.
    dense = dict(zip((a.name for a in func._schema.arguments), d_args))
    dense.update(d_kwargs)
    for name, w in mutated:
        _store_dense(w, dense[name])
        if out is dense[name]:
            out = w  # in-place ops return their argument
    return out


def _mutated_nf4(func, args, kwargs):
    """``[(arg name, NF4Tensor)]`` for each NF4 argument that ``func`` writes to."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        if isinstance(v, NF4Tensor):
            out.append((a.name, v))
    return out
