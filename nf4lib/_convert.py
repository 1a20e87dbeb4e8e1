"""Layer 5: ``convert``, the tree transform that returns a model with NF4 linear layers."""

from __future__ import annotations

import copy
import functools
import importlib
import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from ._codebooks import resolve_code
from ._linear import NF4Linear, check_compute_dtype, code_name_of
from ._plan import DEFAULT_EXCLUDE, Exclude, is_linear_like, plan_modules
from ._quant import check_blocksize, check_flag, check_scale

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
) -> nn.Module:
    """Return a new model in which every ``nn.Linear`` (and transformers' ``Conv1D``, as in
    GPT-2, its weight transposed as bitsandbytes stores it) not excluded is an :class:`NF4Linear`.

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
            ``(linear, name) -> bool`` (called on ``nn.Linear`` and ``Conv1D`` modules only), or a
            sequence of these. Excluding a module excludes
            everything under it. A name or glob that matches no module gives a warning
            (the default, ``("lm_head",)``, does not).
        blocksize, code, double_quant, scale: as in :func:`nf4lib.quantize`
            (``scale="mse"``: each block's scale searched to lower its squared error;
            the checkpoint format is unchanged).
        importance: with ``scale="mse"``, optional per-layer importance weights by
            module name (``(in_features,)`` each, e.g. the layer inputs' mean squares
            from a calibration batch), so each search minimises that layer's output error.
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
    check_flag(double_quant, "double_quant")
    resolve_code(code)  # fail before any work on a bad codebook
    check_compute_dtype(compute_dtype)
    scale = check_scale(scale)
    importance = dict(importance or {})
    if importance and scale != "mse":
        raise ValueError("importance weights apply only with scale='mse'")

    # 1. Plan on the input: which Linear modules become NF4.
    _check_already_converted(model, blocksize, code, double_quant)
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
                layer = NF4Linear.from_linear(lin, blocksize=blocksize, code=code, double_quant=double_quant,
                                              compute_dtype=compute_dtype, scale=scale, importance=importance.get(name))
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


def _transformers_models(model: nn.Module):
    """Every transformers model in the tree whose config no outer one shares: the root,
    or the encoder inside a SentenceTransformer (outermost first)."""
    done = set()
    for hf in model.modules():
        config = getattr(hf, "config", None)
        if hasattr(hf, "save_pretrained") and type(config).__module__.startswith("transformers") and id(config) not in done:
            done.add(id(config))
            yield hf, config


@functools.lru_cache(maxsize=None)
def _bitsandbytes_importable() -> bool:
    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # ImportError, or a broken native library raising its own error
        return False
    return True


def _record_quantization_config(model: nn.Module, blocksize: int, code, double_quant: bool, compute_dtype) -> None:
    """Write bitsandbytes' ``quantization_config`` into a transformers model's config, so
    ``save_pretrained`` output loads with ``from_pretrained`` (transformers + bitsandbytes)
    as a pre-quantized 4-bit model. Only where bitsandbytes can read the weights: NF4/FP4
    at its blocksizes; other settings leave the config as it was. Marks the model
    ``is_loaded_in_4bit`` as bitsandbytes does (see below for when)."""
    for hf, config in _transformers_models(model):
        # PEFT reads ``is_loaded_in_4bit`` as "the base is 4-bit": prepare_model_for_kbit_training
        # turns on gradient checkpointing and the input-grad hook only then. transformers reads
        # it as "the weights are bitsandbytes'" and imports bitsandbytes (num_parameters, which
        # save_pretrained and the Trainer call), so the flag is set only where that import works.
        if _bitsandbytes_importable():
            hf.is_loaded_in_4bit = True
        # transformers' model.dequantize() asks a quantizer the converted model has not got
        hf.__dict__["dequantize"] = _DequantizeInPlace(hf)
        if isinstance(code, str) and code.lower() in ("nf4", "fp4") and 32 <= blocksize <= 4096:
            _set_bnb_config(hf, config, code, double_quant, compute_dtype)
            hf.__dict__.pop("save_pretrained", None)
        else:
            # from_pretrained could not load what save_pretrained would write: refuse before writing
            name = code if isinstance(code, str) else "a user codebook"
            hf.__dict__["save_pretrained"] = _NotForBitsandbytes(f"code {name!r} at blocksize {blocksize}")


class _DequantizeInPlace:
    """``model.dequantize(dtype=None)`` on a converted transformers model, as on one loaded
    with a quantizer: its NF4 layers back to ``nn.Linear`` in place, the quantization
    config removed; returns the model (:func:`dequantize_model` returns a new tree)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        model = dequantize_in_place(self.model, dtype)
        config = getattr(model, "config", None)
        if isinstance(getattr(config, "quantization_config", None), dict):
            del config.quantization_config
        model.__dict__.pop("dequantize", None)
        return model


class _NotForBitsandbytes:
    """Stands in for ``save_pretrained`` on a model whose 4-bit settings bitsandbytes cannot
    read: a checkpoint ``from_pretrained`` could not load is refused before anything is
    written. (An object, not a function, so the model still pickles and deep-copies.)"""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args, **kwargs):
        raise ValueError(
            f"save_pretrained: this model's 4-bit weights ({self.what}) are not in a format bitsandbytes reads "
            f"(NF4/FP4 at blocksizes 32..4096), so from_pretrained could not load the directory. Save with "
            f"nf4lib.save_quantized(model, path) and load with nf4lib.load_quantized, or convert with code='nf4'/'fp4'"
        )


def record_layers_config(model: nn.Module) -> None:
    """:func:`_record_quantization_config` from the NF4Linear layers a model holds (for the
    transforms that build them layer by layer: ``finalize_qat``, ``loftq_convert``), when
    they share one setting; mixed settings leave the config as it was (no single
    bitsandbytes config describes them; ``load_quantized`` reads the file)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    settings = {(m.blocksize, m.code_name, m.double_quant) for m in layers}
    if len(settings) == 1:
        blocksize, code, double_quant = settings.pop()
        _record_quantization_config(model, blocksize, code, double_quant, layers[0].compute_dtype)


def _set_bnb_config(model, config, code, double_quant, compute_dtype) -> None:
    skip = sorted(n for n, m in model.named_modules() if is_linear_like(m))
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
    out = _tree_copy(model, dense)
    for hf, config in _transformers_models(out):  # a full-precision model again: say so
        for attr in ("is_loaded_in_4bit", "save_pretrained", "dequantize"):
            hf.__dict__.pop(attr, None)
        if isinstance(getattr(config, "quantization_config", None), dict):
            del config.quantization_config
    return out


def dequantize_in_place(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every :class:`NF4Linear` inside ``model`` by an ``nn.Linear`` holding its
    dequantized weight, in place (transformers' ``model.dequantize()`` contract; prefer
    :func:`dequantize_model`, which returns a new tree). Returns ``model``."""
    by_weight: dict[int, nn.Parameter] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            lin = _dense_linear(m, dtype, by_weight.get(id(m.weight)))
            by_weight.setdefault(id(m.weight), lin.weight)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    model.__dict__.pop("is_loaded_in_4bit", None)
    model.__dict__.pop("save_pretrained", None)
    return model


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
