"""LoftQ-style initialisation (Li et al. 2023, arXiv 2310.08659).

A 4-bit base ``Q`` and rank-``r`` LoRA factors chosen together so that the adapter
starts by absorbing the quantization error, instead of starting at zero on top of it:

    ``W ~= dequantize(Q) + B @ A``,   ``B (out, r)``, ``A (r, in)``

alternating, ``iterations`` times (``B A = 0`` at first):

    ``Q <- quantize(W - B A)``;   ``B, A <- the best rank-r approximation of W - dequantize(Q)``
    (truncated SVD ``U S V^T``: ``B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T``)

The first iteration's ``Q`` is plain NF4 and its factors already lower the error (the
SVD removes the residual's top ``r`` directions), so the error never exceeds plain NF4's;
the iteration with the lowest ``||W - (dequantize(Q) + B A)||`` is returned. The base
stays an ordinary 4-bit weight (bitsandbytes layout); only its starting adapter differs.

PEFT's own ``init_lora_weights="loftq"`` runs on CUDA / XPU only; :func:`loftq_convert`
plus :func:`load_lora_factors` give the same start on any device, with any PEFT model
built on the converted base.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..core.records import QuantizedTensor
from ..core.spec import QuantSpec, settings
from ..ops.quantize import dequantize, quantize
from ..weight.linear import NF4Linear
from .plan import DEFAULT_EXCLUDE, Exclude, plan_modules
from .tree import replace_modules, run_hooks

__all__ = ["LoftQ", "loftq_init", "loftq_convert", "load_lora_factors"]


class LoftQ(NamedTuple):
    """The result of :func:`loftq_init`.

    Attributes:
        quantized: the 4-bit base, a :class:`QuantizedTensor` ``(out, in)``.
        lora_A: ``(rank, in)``; lora_B: ``(out, rank)``: ``W ~= dequantize(Q) + lora_B @ lora_A``.
        errors: ``||W - (dequantize(Q_t) + B_t A_t)|| / ||W||`` after each iteration ``t``.
        plain_error: the same for plain quantization (``B A = 0``, iteration 1's ``Q``).
    """

    quantized: QuantizedTensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    errors: tuple
    plain_error: float


def _weight_of(weight_or_layer) -> torch.Tensor:
    if isinstance(weight_or_layer, nn.Linear) and not isinstance(weight_or_layer, NF4Linear):
        return weight_or_layer.weight.detach()
    if isinstance(weight_or_layer, torch.Tensor) and weight_or_layer.is_floating_point() and weight_or_layer.dim() == 2:
        return weight_or_layer.detach()
    raise TypeError(f"loftq_init expects a 2-D float weight or an nn.Linear, got {type(weight_or_layer).__name__} "
                    f"{tuple(getattr(weight_or_layer, 'shape', ()))}")


def _positional_iterations(args: tuple, iterations: int, where: str) -> int:
    """``iterations`` given positionally (the old signature): warn, and use it."""
    if not args:
        return iterations
    if len(args) > 1:
        raise TypeError(f"{where} takes 2 positional arguments (the weight or model, and rank); pass the rest by keyword")
    warnings.warn(f"{where}: pass iterations= by keyword; positional iterations is deprecated and will be removed "
                  f"in the next release", DeprecationWarning, stacklevel=3)
    return args[0]


def loftq_init(
    weight_or_layer,
    rank: int,
    *args,
    iterations: int = 5,
    blocksize: int = 64,
    code="nf4",
    double_quant: bool = False,
    scale: str = "absmax",
    factor_dtype: torch.dtype = torch.float32,
    spec: Optional[QuantSpec] = None,
    dtype: Optional[torch.dtype] = None,
) -> LoftQ:
    """Quantize a weight and initialise rank-``rank`` LoRA factors to absorb the error.

    Args:
        weight_or_layer: a 2-D float weight ``(out, in)`` or an ``nn.Linear`` (not modified).
        rank: LoRA rank, ``1 <= rank <= min(out, in)``.
        iterations: alternations of quantize and SVD (LoftQ uses 1-5), at least 1.
        blocksize, code, double_quant, scale: as in :func:`nf4lib.quantize`.
        factor_dtype: dtype of the factors (``dtype`` elsewhere names a weight's source
            dtype; ``dtype=`` here is the deprecated old name of this option).
        spec: the four settings as one :class:`nf4lib.QuantSpec` (then leave them unset).

    Returns:
        A :class:`LoftQ` (base, ``lora_A``, ``lora_B``, per-iteration errors).

    Example:
        >>> r = nf4lib.loftq_init(torch.randn(256, 512), rank=16)
        >>> r.errors[-1] < r.plain_error
        True
    """
    iterations = _positional_iterations(args, iterations, "loftq_init")
    if dtype is not None:
        warnings.warn("loftq_init: dtype= is deprecated and will be removed in the next release; use factor_dtype=",
                      DeprecationWarning, stacklevel=2)
        factor_dtype = dtype
    w = _weight_of(weight_or_layer)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be an int in [1, {min(w.shape)}] for a {tuple(w.shape)} weight, got {rank!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    spec = settings(spec, "loftq_init", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
    target = w.float()
    norm = float(target.norm()) or 1.0
    a = torch.zeros(rank, w.shape[1], device=w.device)
    b = torch.zeros(w.shape[0], rank, device=w.device)
    best, errors, plain = None, [], None
    for _ in range(iterations):
        q = quantize((target - b @ a).to(w.dtype), spec=spec)
        residual = target - dequantize(q, torch.float32)
        if plain is None:
            plain = float(residual.norm()) / norm
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:rank].sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        err = float((residual - b @ a).norm()) / norm
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, q, a, b)
    _, q, a, b = best
    return LoftQ(q, a.to(factor_dtype), b.to(factor_dtype), tuple(errors), plain)


def loftq_convert(
    model: nn.Module,
    rank: int,
    *args,
    iterations: int = 5,
    exclude: Exclude = DEFAULT_EXCLUDE,
    blocksize: int = 64,
    code="nf4",
    double_quant: bool = False,
    scale: str = "absmax",
    compute_dtype: Optional[torch.dtype] = None,
    spec: Optional[QuantSpec] = None,
) -> tuple:
    """Return ``(new_model, factors)``: a converted model whose 4-bit bases are LoftQ's,
    and ``{module name: (lora_A, lora_B)}`` for each converted Linear (``model`` is not
    modified; the new tree shares the tensors of the layers that stay, see
    ``nf4lib.transforms.tree``). Build any LoRA adapter (PEFT's too) on ``new_model`` with
    rank ``rank``, then :func:`load_lora_factors` to start it at LoftQ's factors. The
    settings (or ``spec``) are :func:`loftq_init`'s.
    """
    iterations = _positional_iterations(args, iterations, "loftq_convert")
    if not isinstance(model, nn.Module):
        raise TypeError(f"loftq_convert expects an nn.Module, got {type(model).__name__}")
    spec = settings(spec, "loftq_convert", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
    candidates, _, _ = plan_modules(model, exclude)
    replace, factors = {}, {}
    for mid, (name, lin) in candidates.items():
        r = loftq_init(lin, rank, iterations=iterations, spec=spec)
        replace[mid] = NF4Linear.from_quantized(r.quantized, lin.bias, compute_dtype=compute_dtype)
        factors[name] = (r.lora_A, r.lora_B)
    return run_hooks("quantized", replace_modules(model, replace)), factors


def load_lora_factors(model: nn.Module, factors: dict, adapter: str = "default") -> int:
    """Write LoftQ factors into a LoRA model's adapters, in place; returns how many layers.

    ``model`` is a PEFT model (or any model whose LoRA layers hold ``lora_A[adapter]`` /
    ``lora_B[adapter]`` Linears and a ``scaling[adapter]``, as PEFT's do) built on the
    model :func:`loftq_convert` returned. Each pair is divided by ``sqrt(scaling)`` so
    that ``scaling * B @ A`` is LoftQ's ``B @ A``.

    Raises:
        ValueError: a factor's layer is missing, or its rank does not match.
    """
    by_suffix = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and adapter in getattr(module, "lora_A", {}):
            by_suffix[name] = module
    done = 0
    for name, (a, b) in factors.items():
        hits = [m for full, m in by_suffix.items() if full == name or full.endswith("." + name)]
        if len(hits) != 1:
            raise ValueError(f"load_lora_factors: {len(hits)} LoRA layers match {name!r} (adapter {adapter!r})")
        layer = hits[0]
        la, lb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if la.shape != a.shape or lb.shape != b.shape:
            raise ValueError(f"load_lora_factors: {name!r} has lora_A {tuple(la.shape)} / lora_B {tuple(lb.shape)}, "
                             f"the factors are {tuple(a.shape)} / {tuple(b.shape)} (rank mismatch?)")
        root = math.sqrt(float(layer.scaling[adapter]))
        with torch.no_grad():
            la.copy_(a / root)
            lb.copy_(b / root)
        done += 1
    return done
