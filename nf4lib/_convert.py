"""Layer 5: ``convert``, the tree transform that returns a model with NF4 linear layers."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ._codebooks import resolve_code
from ._linear import NF4Linear, check_compute_dtype, code_name_of
from ._quant import check_blocksize

__all__ = ["convert"]

Exclude = Union[str, Callable[[nn.Module, str], bool], Iterable[Union[str, Callable[[nn.Module, str], bool]]]]

# The default keeps the output head in full precision: quantizing it hurts token
# prediction most. Held as a constant so the default never warns on models without one.
DEFAULT_EXCLUDE = ("lm_head",)
_PROGRESS_MIN_LAYERS = 32


def _split_exclude(exclude) -> tuple[list[str], list[Callable]]:
    if exclude is None:
        return [], []
    if isinstance(exclude, str) or callable(exclude):
        exclude = [exclude]
    try:
        items = list(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a name, a glob, a predicate or a sequence of them, got {exclude!r}") from None
    patterns, predicates = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif callable(item):
            predicates.append(item)
        else:
            raise TypeError(f"exclude entries must be str or callable (module, name) -> bool, got {item!r}")
    return patterns, predicates


def _matches(pattern: str, name: str) -> bool:
    # A full dotted name, a last component ("lm_head"), or an fnmatch glob ("*.mlp.*").
    return name == pattern or name.rsplit(".", 1)[-1] == pattern or fnmatch.fnmatchcase(name, pattern)


def plan(model: nn.Module, exclude: Exclude = DEFAULT_EXCLUDE):
    """Which ``nn.Linear`` modules :func:`convert` turns into NF4, without changing anything.

    Returns:
        ``(candidates, unmatched, tied)``: ``{id(module): (name, module)}`` in visiting
        order; the name/glob patterns that matched no module; the names of Linears kept
        because their weight is tied to a module that stays.
    """
    patterns, predicates = _split_exclude(exclude)
    matched: set[str] = set()
    excluded_ids: set[int] = set()
    candidates: dict[int, tuple[str, nn.Linear]] = {}

    def visit(module: nn.Module, name: str, excluded: bool) -> None:
        if not excluded:
            hits = [p for p in patterns if _matches(p, name)] if name else []
            matched.update(hits)
            # Predicates see Linear layers only (they may read in_features, out_features, ...)
            is_linear = isinstance(module, nn.Linear)
            excluded = bool(hits) or (is_linear and any(bool(pred(module, name)) for pred in predicates))
        if excluded:
            excluded_ids.add(id(module))
        elif type(module) is not NF4Linear and isinstance(module, nn.Linear):
            candidates.setdefault(id(module), (name, module))
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name, excluded)

    visit(model, "", False)
    for mid in excluded_ids:
        candidates.pop(mid, None)  # a module reached by two paths is excluded if either excludes it

    # A weight that a staying module also uses (a tied lm_head / embedding) stays.
    kept_params = {
        id(p) for m in model.modules() if id(m) not in candidates for p in m._parameters.values() if p is not None
    }
    tied = []
    for mid, (name, lin) in list(candidates.items()):
        if id(lin.weight) in kept_params:
            tied.append(name)
            del candidates[mid]
    return candidates, [p for p in patterns if p not in matched], tied


def convert(
    model: nn.Module,
    *,
    exclude: Exclude = DEFAULT_EXCLUDE,
    blocksize: int = 64,
    code="nf4",
    double_quant: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Return a new model in which every ``nn.Linear`` not excluded is an :class:`NF4Linear`.

    A tree transform: ``model`` is left as it was (its modules, parameters and values
    unchanged). The new tree has its own module objects and its own ``Parameter``
    objects, but **the tensors of layers that are not converted (embeddings, norms, the
    excluded head) share storage with ``model``**: moving the new model (``.to()``) leaves
    ``model`` where it was, but writing into those tensors in place (an optimizer step on a
    norm, ``weight.data.mul_()``) shows in both. Layers are quantized one at a time, so the
    peak memory is about the model, its 4-bit copy and one layer's temporaries.

    Args:
        model: any module (a bare ``nn.Linear`` too). On the meta device the result is an
            empty skeleton for :func:`nf4lib.load_quantized` / ``load_state_dict(assign=True)``.
        exclude: what stays full precision: module names (full dotted name, or a last
            component like ``"lm_head"``), fnmatch globs (``"*.mlp.*"``), predicates
            ``(linear, name) -> bool`` (called on ``nn.Linear`` modules only), or a
            sequence of these. Excluding a module excludes
            everything under it. A name or glob that matches no module gives a warning
            (the default, ``("lm_head",)``, does not).
        blocksize, code, double_quant: as in :func:`nf4lib.quantize`.
        compute_dtype: dtype of the matmul; ``None`` keeps each layer's own dtype.
            fp32, fp16, bf16.
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
    check_blocksize(blocksize)
    resolve_code(code)  # fail before any work on a bad codebook
    check_compute_dtype(compute_dtype)

    # 1. Plan on the input: which Linear modules become NF4.
    _check_already_converted(model, blocksize, code, double_quant)
    candidates, unmatched, tied = plan(model, exclude)
    if exclude is not DEFAULT_EXCLUDE:
        for p in unmatched:
            warnings.warn(f"convert: exclude pattern {p!r} matched no module", stacklevel=2)
    for name in tied:
        warnings.warn(f"convert: {name!r} keeps full precision: its weight is tied to a layer that is not converted", stacklevel=2)

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
                layer = NF4Linear.from_linear(lin, blocksize=blocksize, code=code, double_quant=double_quant, compute_dtype=compute_dtype)
                layer.weight._nf4_name = name  # named in errors (FSDP2 sharding a weight that does not split)
                by_weight[id(lin.weight)] = layer
            else:  # the same weight tensor: share the quantized weight Parameter too
                layer = NF4Linear.from_quantized(twin.quantized, lin.bias, compute_dtype=compute_dtype)
                layer.weight = twin.weight
            converted[mid] = layer

    if id(model) in candidates:  # the model itself is a Linear
        return converted[id(model)]
    # 3. Copy the tree with the NF4 layers in place of the Linears, sharing the other tensors.
    new_model = _tree_copy(model, converted)
    if converted:
        _record_quantization_config(new_model, blocksize, code, double_quant, next(iter(converted.values())).compute_dtype)
    return new_model


def _record_quantization_config(model: nn.Module, blocksize: int, code, double_quant: bool, compute_dtype) -> None:
    """Write bitsandbytes' ``quantization_config`` into a transformers model's config, so
    ``save_pretrained`` output loads with ``from_pretrained`` (transformers + bitsandbytes)
    as a pre-quantized 4-bit model. Only where bitsandbytes can read the weights: NF4/FP4
    at its blocksizes; other settings leave the config as it was."""
    if not (isinstance(code, str) and code.lower() in ("nf4", "fp4") and 32 <= blocksize <= 4096):
        return
    # every transformers model in the tree (the root, or the encoder inside a SentenceTransformer)
    done = set()
    for hf in model.modules():  # outermost first: an inner LlamaModel shares its parent's config
        config = getattr(hf, "config", None)
        if hasattr(hf, "save_pretrained") and type(config).__module__.startswith("transformers") and id(config) not in done:
            done.add(id(config))
            _set_bnb_config(hf, config, code, double_quant, compute_dtype)


def _set_bnb_config(model, config, code, double_quant, compute_dtype) -> None:
    skip = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, NF4Linear))
    config.quantization_config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": code.lower(),
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
    }



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
        return _dense_linear(model, dtype)
    dense: dict[int, nn.Linear] = {}
    by_weight: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, NF4Linear) and id(m) not in dense:
            # the dense layer goes straight into the copy: the 4-bit layer is never copied
            lin = _dense_linear(m, dtype, by_weight.get(id(m.weight)))
            by_weight.setdefault(id(m.weight), lin.weight)  # twins (one weight, two layers) stay tied
            dense[id(m)] = lin
    return _tree_copy(model, dense)


def _tree_copy(model: nn.Module, replace: dict) -> nn.Module:
    """A copy of ``model``'s tree in which each module ``replace`` names (by id) is its
    replacement, every Parameter is a new object over the same storage, and buffers are
    shared: new modules and Parameters, no copied tensor data."""
    memo: dict[int, object] = dict(replace)
    for t in list(model.parameters()):
        memo.setdefault(id(t), nn.Parameter(t.data, requires_grad=t.requires_grad))
    for t in list(model.buffers()):
        memo.setdefault(id(t), t)
    return copy.deepcopy(model, memo)


def _dense_linear(layer: NF4Linear, dtype, weight=None) -> nn.Linear:
    dt = dtype or layer.weight_dtype
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dt)
    lin.weight = weight if weight is not None else nn.Parameter(layer.dequantize(dt), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().to(dt, copy=True), requires_grad=layer.bias.requires_grad)
    return lin


def _check_already_converted(model: nn.Module, blocksize: int, code, double_quant: bool) -> None:
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


def progress_bar(iterable, *, total: int, desc: str, unit: str, show: Optional[bool]):
    """A tqdm bar on stderr over ``iterable``; ``show=None`` lets tqdm decide (a bar on a
    terminal, none in a log file)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if show is None else not show)
