"""Quantization-aware training (QAT) for NF4.

``prepare_qat(model)`` returns a new model whose Linear layers train their full-precision
weight through :func:`nf4lib.fake_quantize` (the forward sees exactly the 4-bit values);
``finalize_qat(qat_model)`` returns a plain converted model (``NF4Linear`` layers, the
bitsandbytes layout) whose 4-bit weights are those the training forward used.

    >>> qat = nf4lib.prepare_qat(model)                  # model is left as it was
    >>> ... train qat as usual (all parameters trainable) ...
    >>> q4 = nf4lib.finalize_qat(qat)                    # NF4Linear layers, ready to save

Why: a model trained in full precision and quantized after (post-training quantization)
meets the rounding only at the end; QAT lets the weights move to where their 4-bit
values serve the loss, so the finalised model loses less.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.spec import QuantSpec, deprecated_keyword, settings
from ..ops.fake_quant import _STE, block_absmax, encode_with_scales, fake_quantize
from ..ops.quantize import quantize
from ..weight.linear import NF4Linear, check_compute_dtype
from .plan import DEFAULT_EXCLUDE, Exclude, plan_modules
from .tree import replace_modules, run_hooks

__all__ = ["QATLinear", "prepare_qat", "finalize_qat"]

_MODES = ("absmax", "mse", "learned")


class QATLinear(nn.Module):
    """A Linear trained through NF4 fake quantization.

    Attributes:
        weight: the full-precision weight (trainable), ``(out_features, in_features)``.
        bias: as ``nn.Linear``'s.
        scale: with ``scale="learned"``, the float32 per-block scales ``(n_blocks,)``
            (trainable, LSQ); None otherwise.
        mode: how the block scales are set: ``"absmax"``, ``"mse"`` (searched each step)
            or ``"learned"`` (the constructor's ``scale=``).
    """

    def __init__(self, linear: nn.Linear, *, blocksize: int = 64, code="nf4", scale: Optional[str] = None,
                 ste: str = "identity", mode: Optional[str] = None):
        super().__init__()
        if mode is not None:
            scale = deprecated_keyword("mode", "scale", "QATLinear", mode, scale)
        scale = "absmax" if scale is None else scale
        if scale not in _MODES:
            raise ValueError(f"scale must be one of {_MODES}, got {scale!r}")
        if ste not in _STE:
            raise ValueError(f"ste must be one of {_STE}, got {ste!r}")
        spec = QuantSpec(blocksize=blocksize, code=code)  # the settings' one check
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocksize, self.code, self.mode, self.ste = spec.blocksize, code, scale, ste
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        self.scale = nn.Parameter(block_absmax(self.weight, blocksize=spec.blocksize)) if scale == "learned" else None

    def quantized_weight(self) -> torch.Tensor:
        """The 4-bit values the forward uses (differentiable, see ``fake_quantize``)."""
        scale = self.scale if self.mode == "learned" else self.mode
        return fake_quantize(self.weight, blocksize=self.blocksize, code=self.code, scale=scale, ste=self.ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, mode={self.mode}, blocksize={self.blocksize}"


def prepare_qat(
    model: nn.Module,
    *,
    exclude: Exclude = DEFAULT_EXCLUDE,
    blocksize: int = 64,
    code="nf4",
    scale: str = "absmax",
    ste: str = "identity",
    spec: Optional[QuantSpec] = None,
) -> nn.Module:
    """Return a new model in which every ``nn.Linear`` not excluded is a :class:`QATLinear`
    (with its own copy of the weight, trained in full precision). A tree transform
    (``nf4lib.transforms.tree``): ``model`` is not modified, and the tensors of the layers
    that stay (embeddings, norms) share storage with it, so training them changes both;
    pass ``copy.deepcopy(model)`` to keep an independent original (a teacher, say).

    Args:
        model: any module.
        exclude: as in :func:`nf4lib.convert` (default: the ``lm_head`` stays full precision).
        blocksize, code: as in :func:`nf4lib.quantize`.
        scale: ``"absmax"``, ``"mse"`` (each block's scale searched every forward: the
            same search ``quantize(scale="mse")`` does) or ``"learned"`` (per-block
            scales as trainable parameters, started at absmax; LSQ).
        ste: ``"identity"`` or ``"clipped"`` (see :func:`nf4lib.fake_quantize`).

    Raises:
        TypeError: ``model`` is not a module. ValueError: a bad setting.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat expects an nn.Module, got {type(model).__name__}")
    if scale not in _MODES:
        raise ValueError(f"scale must be one of {_MODES}, got {scale!r}")
    if ste not in _STE:
        raise ValueError(f"ste must be one of {_STE}, got {ste!r}")
    if scale == "learned":  # not a QuantSpec scale: the spec gives blocksize and code
        spec = settings(spec, "prepare_qat", blocksize=blocksize, code=code)
    else:
        spec = settings(spec, "prepare_qat", blocksize=blocksize, code=code, scale=scale)
        scale = spec.scale
    if spec.double_quant:
        raise ValueError("prepare_qat: QAT does not simulate double quantization; pass a spec with double_quant=False")
    candidates, _, _ = plan_modules(model, exclude)
    replace = {mid: QATLinear(lin, blocksize=spec.blocksize, code=spec.code, scale=scale, ste=ste) for mid, (_, lin) in candidates.items()}
    return run_hooks("quantized", replace_modules(model, replace))


def _finalized(layer: QATLinear, compute_dtype) -> NF4Linear:
    w = layer.weight.detach()
    if layer.mode == "learned":
        q = encode_with_scales(w, layer.scale, blocksize=layer.blocksize, code=layer.code)
    else:
        q = quantize(w, blocksize=layer.blocksize, code=layer.code, scale=layer.mode)
    return NF4Linear.from_quantized(q, layer.bias, compute_dtype=compute_dtype)  # names its codebook from q.code


def finalize_qat(model: nn.Module, *, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Return a new model in which every :class:`QATLinear` is an :class:`NF4Linear`
    holding the 4-bit weight its forward used (``model`` is not modified).

    The result is a plain converted model: it saves in the bitsandbytes layout and
    computes, layer by layer, what the QAT forward computed (exactly the same weights;
    the matmul may sum in another order).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"finalize_qat expects an nn.Module, got {type(model).__name__}")
    check_compute_dtype(compute_dtype)
    replace = {id(m): _finalized(m, compute_dtype) for m in model.modules() if isinstance(m, QATLinear)}
    if not replace:
        raise ValueError("finalize_qat: the model has no QATLinear layers (was it made by prepare_qat?)")
    return run_hooks("quantized", replace_modules(model, replace))
