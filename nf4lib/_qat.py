"""Layer 5: quantization-aware training (QAT) for NF4.

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

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._codebooks import resolve_code
from ._convert import record_layers_config
from ._fake import _STE, block_absmax, encode_with_scales, fake_quantize
from ._linear import NF4Linear, check_compute_dtype
from ._plan import DEFAULT_EXCLUDE, Exclude, plan_modules
from ._quant import check_blocksize, quantize

__all__ = ["QATLinear", "prepare_qat", "finalize_qat"]

_MODES = ("absmax", "mse", "learned")


class QATLinear(nn.Module):
    """A Linear trained through NF4 fake quantization.

    Attributes:
        weight: the full-precision weight (trainable), ``(out_features, in_features)``.
        bias: as ``nn.Linear``'s.
        scale: with ``mode="learned"``, the float32 per-block scales ``(n_blocks,)``
            (trainable, LSQ); None otherwise.
        mode: ``"absmax"``, ``"mse"`` (searched each step) or ``"learned"``.
    """

    def __init__(self, linear: nn.Linear, *, blocksize: int = 64, code="nf4", mode: str = "absmax", ste: str = "identity"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocksize, self.code, self.mode, self.ste = blocksize, code, mode, ste
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        self.scale = nn.Parameter(block_absmax(self.weight, blocksize)) if mode == "learned" else None

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
) -> nn.Module:
    """Return a new model (a deep copy: training it leaves ``model`` as it was) in which
    every ``nn.Linear`` not excluded is a :class:`QATLinear`.

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
    check_blocksize(blocksize)
    resolve_code(code)
    if scale not in _MODES:
        raise ValueError(f"scale must be one of {_MODES}, got {scale!r}")
    if ste not in _STE:
        raise ValueError(f"ste must be one of {_STE}, got {ste!r}")
    candidates, _, _ = plan_modules(model, exclude)
    replace = {mid: QATLinear(lin, blocksize=blocksize, code=code, mode=scale, ste=ste) for mid, (_, lin) in candidates.items()}
    if id(model) in replace:
        return replace[id(model)]
    out = copy.deepcopy(model, dict(replace))
    record_layers_config(out)  # save_pretrained output loads with transformers + bitsandbytes
    return out


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
    if id(model) in replace:
        return replace[id(model)]
    out = copy.deepcopy(model, dict(replace))
    record_layers_config(out)  # save_pretrained output loads with transformers + bitsandbytes
    return out
