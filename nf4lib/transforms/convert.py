"""``convert`` and ``dequantize_model``: the tree transforms between a model's Linear layers
and NF4 ones (see ``tree`` for what a new tree shares with its input)."""

from __future__ import annotations

import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from ..core.codebooks import resolve_code
from ..core.spec import QuantSpec, settings
from ..weight.linear import NF4Linear, check_compute_dtype, code_name_of
from .plan import DEFAULT_EXCLUDE, Exclude, plan_modules, progress_bar
from .tree import replace_modules, run_hooks

__all__ = ["convert", "dequantize_model"]

_PROGRESS_MIN_LAYERS = 32


def convert(
    model: nn.Module,
    *,
    exclude: Exclude = DEFAULT_EXCLUDE,
    blocksize: int = 64,
    code="nf4",
    double_quant: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    progress: Optional[bool] = None,
    scale: str = "absmax",
    importance: Optional[Mapping[str, torch.Tensor]] = None,
    spec: Optional[QuantSpec] = None,
    calibration=None,
) -> nn.Module:
    """Return a new model in which every ``nn.Linear`` (and transformers' ``Conv1D``, as in
    GPT-2, its weight transposed as bitsandbytes stores it) not excluded is an :class:`NF4Linear`.

    A tree transform (``nf4lib.transforms.tree``): ``model`` is left as it was (its
    modules, parameters and values unchanged). The new tree has its own module objects and
    its own ``Parameter`` objects, but **the tensors of layers that are not converted
    (embeddings, norms, the excluded head) share storage with ``model``**: moving the new
    model (``.to()``) leaves ``model`` where it was, but writing into those tensors in place
    (an optimizer step on a norm, ``weight.data.mul_()``) shows in both. Layers are
    quantized one at a time, so the peak memory is about the model, its 4-bit copy and one
    layer's temporaries.

    Args:
        model: any module (a bare ``nn.Linear`` too). On the meta device the result is an
            empty skeleton for :func:`nf4lib.load_quantized` / ``load_state_dict(assign=True)``.
        exclude: what stays full precision: module names (full dotted name, or a last
            component like ``"lm_head"``), fnmatch globs (``"*.mlp.*"``), predicates
            ``(linear, name) -> bool`` (called on ``nn.Linear`` and ``Conv1D`` modules only), or a
            sequence of these. Excluding a module excludes
            everything under it. A name or glob that matches no module gives a warning
            (the default, ``("lm_head",)``, does not).
        blocksize, code, double_quant, scale: as in :func:`nf4lib.quantize`
            (``scale="mse"``: each block's scale searched to lower its squared error;
            the checkpoint format is unchanged).
        spec: those four settings as one :class:`nf4lib.QuantSpec` (then leave them unset).
        importance: with ``scale="mse"``, optional per-layer importance weights by
            module name (``(in_features,)`` each, e.g. the layer inputs' mean squares
            from a calibration batch), so each search minimises that layer's output error.
        compute_dtype: dtype of the matmul; ``None`` keeps each layer's own dtype.
            fp32, fp16, bf16.
        calibration: calibration batches (as :func:`nf4lib.gptq.calibrate` takes them, e.g.
            ``nf4lib.gptq.text_batches(tokenizer)``): quantize with GPTQ, layer by layer, keeping it
            per layer only where it beats plain rounding on a held-out quarter of the batches.
            The same format; :func:`nf4lib.gptq.calibrate` has GPTQ's options and the per-layer report.
        progress: show a tqdm bar; ``None`` shows one for 32 layers or more (on a terminal).

    Raises:
        ValueError: ``model`` already holds NF4Linear layers quantized with other settings
            (re-quantizing 4-bit weights would compound the error; convert the
            full-precision model instead). Layers already in 4 bits with the same
            settings are kept as they are.

    Returns:
        The new model. A Linear whose weight is tied to a module that stays (say an
        ``lm_head`` sharing the embedding) is kept as it is, with a warning, so the tie
        holds; Linears sharing one weight share one quantized weight.

    Example:
        >>> qmodel = nf4lib.convert(model)                         # keeps lm_head
        >>> qmodel = nf4lib.convert(model, exclude=["*.mlp.*", lambda m, n: m.out_features < 64])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    spec = settings(spec, "convert", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
    check_compute_dtype(compute_dtype)
    importance = dict(importance or {})
    if importance and spec.scale != "mse":
        raise ValueError("importance weights apply only with scale='mse'")
    if calibration is not None:
        if importance:
            raise ValueError("convert: give calibration or importance weights, not both (calibration uses the inputs' "
                             "full second moments, which subsume the importance weights)")
        from .calibrate import calibrate

        return calibrate(model, calibration, spec=spec, exclude=exclude, compute_dtype=compute_dtype,
                         progress=progress).model

    # 1. Plan on the input: which Linear modules become NF4.
    _check_already_converted(model, spec)
    candidates, unmatched, tied = plan_modules(model, exclude)
    unknown = set(importance) - {name for name, _ in candidates.values()}
    if unknown:
        raise ValueError(f"importance names layers that are not converted: {sorted(unknown)}")
    if exclude is not DEFAULT_EXCLUDE:
        for p in unmatched:
            warnings.warn(f"convert: exclude pattern {p!r} matched no module", stacklevel=2)
    for name in tied:
        warnings.warn(f"convert: {name!r} keeps full precision: its weight is tied to a layer that is not converted", stacklevel=2)
    if not candidates and not any(isinstance(m, NF4Linear) for m in model.modules()):
        warnings.warn(f"convert: no layer of this {type(model).__name__} was converted: it has no nn.Linear or Conv1D "
                      f"outside exclude={exclude!r}; the result holds the same full-precision weights", stacklevel=2)

    # 2. Quantize layer by layer; a Linear that appears twice (or shares a weight) is done once.
    items = list(candidates.items())
    if progress is None and len(items) < _PROGRESS_MIN_LAYERS:
        progress = False
    by_weight: dict[int, NF4Linear] = {}
    converted: dict[int, NF4Linear] = {}
    with progress_bar(items, total=len(items), desc="nf4lib.convert", unit="layer", show=progress) as bar:
        for mid, (name, lin) in bar:
            twin = by_weight.get(id(lin.weight))
            if twin is None:
                layer = NF4Linear.from_linear(lin, spec=spec, compute_dtype=compute_dtype, importance=importance.get(name),
                                              layer_name=name)
                by_weight[id(lin.weight)] = layer
            else:  # the same weight tensor: share the quantized weight Parameter too
                layer = NF4Linear.from_quantized(twin.quantized, lin.bias, compute_dtype=compute_dtype)
                layer.weight = twin.weight
            converted[mid] = layer

    # 3. Copy the tree with the NF4 layers in place of the Linears, sharing the other tensors.
    if id(model) in candidates:  # the model itself is a Linear
        return converted[id(model)]
    new_model = replace_modules(model, converted)
    return run_hooks("quantized", new_model) if converted else new_model


def dequantize_model(model: nn.Module, *, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Return a new model in which every :class:`NF4Linear` is an ``nn.Linear`` holding its
    dequantized weight: the inverse of :func:`convert` (up to the 4-bit rounding).

    A tree transform like :func:`convert`: ``model`` is not modified; the layers that are
    not NF4 (embeddings, norms, LoRA adapters of a PEFT model) share storage with it.
    This is the first step of the 16-bit merge recipe: dequantize the base, merge the
    adapters into full-precision weights (``merge_and_unload``), save in bf16.

    Args:
        model: a module holding NF4Linear layers (a PEFT-wrapped model too).
        dtype: the dense weights' dtype; ``None``: the dtype each layer was quantized from.

    Example:
        >>> merged = nf4lib.dequantize_model(peft_model, dtype=torch.bfloat16).merge_and_unload()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dequantize_model expects an nn.Module, got {type(model).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    if isinstance(model, NF4Linear):
        return dense_linear(model, dtype)
    dense: dict[int, nn.Linear] = {}
    by_weight: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, NF4Linear) and id(m) not in dense:
            # the dense layer goes straight into the copy: the 4-bit layer is never copied
            lin = dense_linear(m, dtype, by_weight.get(id(m.weight)))
            by_weight.setdefault(id(m.weight), lin.weight)  # twins (one weight, two layers) stay tied
            dense[id(m)] = lin
    return run_hooks("dequantized", replace_modules(model, dense))


def dense_linear(layer: NF4Linear, dtype, weight=None) -> nn.Linear:
    dt = dtype or layer.weight_dtype
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dt)
    lin.weight = weight if weight is not None else nn.Parameter(layer.dequantize(dt), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().to(dt, copy=True), requires_grad=layer.bias.requires_grad)
    return lin


def _check_already_converted(model: nn.Module, spec: QuantSpec) -> None:
    blocksize, code, double_quant = spec.blocksize, spec.code, spec.double_quant
    want_code = code_name_of(code) or "custom"
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            have = (m.blocksize, m.code_name, m.double_quant)
            if have != (blocksize, want_code, bool(double_quant)) or (want_code == "custom" and not torch.equal(m.weight.quant_map.cpu(), resolve_code(code))):
                raise ValueError(
                    f"convert: {name or 'the model'!r} is already NF4 (blocksize={have[0]}, code={have[1]}, "
                    f"double_quant={have[2]}); converting it to blocksize={blocksize}, code={want_code}, "
                    f"double_quant={bool(double_quant)} would re-quantize 4-bit values. Convert the full-precision model."
                )
