"""The one tree transform every model-level function is built on, and its storage policy.

``replace_modules(model, replacements)`` returns a **new tree**: new module objects and new
``Parameter`` objects throughout, with each module named in ``replacements`` swapped for
its replacement. Tensors are not copied: the parameters and buffers of modules that are
not replaced **share storage** with ``model``. So moving the new tree (``.to()``) leaves
``model`` where it was, and ``model`` is never modified, but writing into a shared
tensor in place (an optimizer step on a norm of the new tree) shows in both; call
``copy.deepcopy(model)`` first for an independent copy. ``convert``,
``dequantize_model``, ``prepare_qat``, ``finalize_qat`` and ``loftq_convert`` all follow
this policy.

Integrations that keep per-model metadata (``integrations.transformers_config`` writes
bitsandbytes' ``quantization_config`` into a transformers model's config) register a
hook with :func:`register_hook`; the transforms call it on every tree they return.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

from torch import nn

__all__ = ["replace_modules", "register_hook", "run_hooks"]

# event -> hooks: "quantized" (a tree whose NF4 layers were just made) and "dequantized"
_HOOKS: dict[str, list] = {"quantized": [], "dequantized": []}


def replace_modules(model: nn.Module, replacements: Mapping[int, nn.Module]) -> nn.Module:
    """A new tree: ``model`` with each module whose ``id`` is a key of ``replacements``
    replaced by its value (the replacement itself, when that is ``model``), every other
    module and Parameter a new object over the same storage, buffers shared."""
    if id(model) in replacements:
        return replacements[id(model)]
    memo: dict[int, object] = dict(replacements)
    for t in list(model.parameters()):
        memo.setdefault(id(t), nn.Parameter(t.data, requires_grad=t.requires_grad))
    for t in list(model.buffers()):
        memo.setdefault(id(t), t)
    return copy.deepcopy(model, memo)


def register_hook(event: str, fn: Callable[[nn.Module], None]) -> None:
    """Call ``fn(model)`` on every tree a transform returns after ``event``:
    ``"quantized"`` (convert, finalize_qat, loftq_convert, transformers' quantize-on-load)
    or ``"dequantized"`` (dequantize_model, ``model.dequantize()``)."""
    if event not in _HOOKS:
        raise ValueError(f"unknown event {event!r}; expected one of {tuple(_HOOKS)}")
    if fn not in _HOOKS[event]:
        _HOOKS[event].append(fn)


def run_hooks(event: str, model: nn.Module) -> nn.Module:
    for fn in _HOOKS[event]:
        fn(model)
    return model
