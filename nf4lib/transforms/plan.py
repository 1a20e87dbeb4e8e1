"""The one planner deciding which weights become 4-bit, for a module tree
(``convert``, ``analysis``, the transformers loader) and for a bare checkpoint (the command
line), with one reading of ``exclude``.

In a module tree the linear weights are the ``nn.Linear`` modules and transformers' ``Conv1D``
(GPT-2's layers, whose weight is stored transposed). A bare checkpoint does
not say which tensors belong to linear layers: nf4lib takes a tensor for a linear weight
when it is a 2-D fp64/fp32/fp16/bf16 tensor named ``*.weight`` whose name does not look like an
embedding (``embed``, ``wte``, ``wpe``). Either way an exclude pattern names a module (a
full dotted name, a last component like ``"lm_head"``, or an fnmatch glob), and excluding
a module excludes everything under it.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, NamedTuple, Optional, Union

from torch import nn

from ..weight.linear import NF4Linear, is_conv1d

__all__ = ["DEFAULT_EXCLUDE", "Plan", "plan_modules", "plan_checkpoint", "excluded", "is_conv1d", "is_linear_like"]

class Plan(NamedTuple):
    """What a planner chose: ``layers`` to quantize, in order; ``unmatched``, the exclude
    names/globs that matched nothing (worth a warning); ``tied``, linear layers kept in
    full precision because their weight is shared with a layer that stays."""

    layers: dict
    unmatched: tuple
    tied: tuple


Exclude = Union[str, Callable[[nn.Module, str], bool], Iterable[Union[str, Callable[[nn.Module, str], bool]]]]

# The default keeps the output head in full precision: quantizing it hurts token
# prediction most. Held as a constant so the default never warns on models without one.
DEFAULT_EXCLUDE = ("lm_head",)


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


def is_linear_like(module: nn.Module) -> bool:
    """A layer :func:`nf4lib.convert` turns into an NF4Linear: ``nn.Linear`` or ``Conv1D``."""
    return (isinstance(module, nn.Linear) and type(module) is not NF4Linear and not isinstance(module, NF4Linear)) or is_conv1d(module)


def plan_modules(model: nn.Module, exclude: Exclude = DEFAULT_EXCLUDE) -> Plan:
    """Which linear layers (``nn.Linear``, transformers' ``Conv1D``) :func:`convert` turns
    into NF4, without changing anything.

    Returns:
        A :class:`Plan` whose ``layers`` are ``{id(module): (name, module)}`` in visiting
        order, and whose ``tied`` are the Linears kept because their weight is tied to a
        module that stays.
    """
    patterns, predicates = _split_exclude(exclude)
    matched: set[str] = set()
    excluded_ids: set[int] = set()
    candidates: dict[int, tuple[str, nn.Linear]] = {}

    def visit(module: nn.Module, name: str, excluded: bool) -> None:
        if not excluded:
            hits = [p for p in patterns if _matches(p, name)] if name else []
            matched.update(hits)
            # Predicates see linear layers only (nn.Linear, and Conv1D with its nx / nf)
            is_linear = isinstance(module, nn.Linear) or is_conv1d(module)
            excluded = bool(hits) or (is_linear and any(bool(pred(module, name)) for pred in predicates))
        if excluded:
            excluded_ids.add(id(module))
        elif is_linear_like(module):
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
    return Plan(candidates, tuple(p for p in patterns if p not in matched), tuple(tied))




_EMBEDDING_HINTS = ("embed", "wte", "wpe")


def is_linear_weight(name: str, dtype: str, shape) -> bool:
    """The module docstring's rule for spotting linear weights in a bare checkpoint
    (``dtype`` as safetensors names it: ``"F32"``, ``"BF16"``, ...)."""
    if not name.endswith(".weight") or len(shape) != 2 or dtype not in ("F64", "F32", "F16", "BF16"):
        return False
    return not any(h in name.lower() for h in _EMBEDDING_HINTS)


def excluded(name: str, patterns) -> bool:
    """Whether a weight's module (``name`` without ``.weight``) or any parent matches."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = module.split(".")
    return any(_matches(p, ".".join(parts[: i + 1])) for p in patterns for i in range(len(parts)))


def plan_checkpoint(tensors: dict, exclude=DEFAULT_EXCLUDE) -> Plan:
    """Which tensors of a bare checkpoint become 4-bit.

    Args:
        tensors: ``{name: (dtype, shape)}`` from the safetensors headers (dtype as a
            safetensors name).
        exclude: names or globs, as for :func:`nf4lib.convert` (predicates need modules,
            which a bare checkpoint has not).

    Returns:
        A :class:`Plan` whose ``layers`` are ``{name: (dtype, shape)}`` of the chosen weights.

    Raises:
        ValueError: the checkpoint already holds 4-bit weights (bitsandbytes' ``quant_state``
            entries): quantizing again would compound the error.
    """
    patterns, predicates = _split_exclude(exclude)
    if predicates:
        raise TypeError(f"a bare checkpoint has no modules to call exclude predicates on: {predicates[0]!r}")
    quantized = sorted(n for n in tensors if ".quant_state." in n)
    if quantized:
        raise ValueError(f"already quantized (it holds 4-bit weights, e.g. {quantized[0]!r}); nothing to do")
    unmatched = tuple(p for p in patterns if not any(excluded(n, [p]) for n in tensors))
    layers = {n: v for n, v in tensors.items() if is_linear_weight(n, *v) and not excluded(n, patterns)}
    return Plan(layers, unmatched, ())


def progress_bar(iterable, *, total: int, desc: str, unit: str, show: Optional[bool]):
    """A tqdm bar on stderr over ``iterable``; ``show=None`` lets tqdm decide (a bar on a
    terminal, none in a log file)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if show is None else not show)
