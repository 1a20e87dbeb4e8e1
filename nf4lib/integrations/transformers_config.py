"""transformers' view of a converted model: bitsandbytes' ``quantization_config`` in its
config (so ``save_pretrained`` output loads with ``from_pretrained`` through transformers +
bitsandbytes), ``is_loaded_in_4bit`` (read by PEFT), and ``model.dequantize()``.

Registered as hooks of the tree transforms (``transforms.tree.register_hook``): nothing
here imports transformers; a model is recognised by its config's class.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch
from torch import nn

from ..transforms.convert import dense_linear
from ..transforms.plan import is_linear_like
from ..transforms.tree import register_hook
from ..weight.linear import NF4Linear

__all__ = ["record_quantization_config", "on_quantized", "on_dequantized", "dequantize_in_place"]


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


def record_quantization_config(model: nn.Module, blocksize: int, code, double_quant: bool, compute_dtype) -> None:
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
            name = code if isinstance(code, str) and code != "custom" else "a user codebook"
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


def on_quantized(model: nn.Module) -> None:
    """:func:`record_quantization_config` from the NF4Linear layers a new tree holds, when
    they share one setting; mixed settings leave the config as it was (no single
    bitsandbytes config describes them; ``load_quantized`` reads the file)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    settings = {(m.blocksize, m.code_name, m.double_quant) for m in layers}
    if len(settings) == 1:
        blocksize, code, double_quant = settings.pop()
        record_quantization_config(model, blocksize, code, double_quant, layers[0].compute_dtype)


def on_dequantized(model: nn.Module) -> None:
    """A full-precision model again: drop what :func:`record_quantization_config` set."""
    for hf, config in _transformers_models(model):
        for attr in ("is_loaded_in_4bit", "save_pretrained", "dequantize"):
            hf.__dict__.pop(attr, None)
        if isinstance(getattr(config, "quantization_config", None), dict):
            del config.quantization_config


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



def dequantize_in_place(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every :class:`NF4Linear` inside ``model`` by an ``nn.Linear`` holding its
    dequantized weight, in place (transformers' ``model.dequantize()`` contract; prefer
    :func:`dequantize_model`, which returns a new tree). Returns ``model``."""
    by_weight: dict[int, nn.Parameter] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            lin = dense_linear(m, dtype, by_weight.get(id(m.weight)))
            by_weight.setdefault(id(m.weight), lin.weight)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    model.__dict__.pop("is_loaded_in_4bit", None)
    model.__dict__.pop("save_pretrained", None)
    return model



register_hook("quantized", on_quantized)
register_hook("dequantized", on_dequantized)
