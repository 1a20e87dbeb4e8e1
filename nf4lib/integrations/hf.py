"""Quantize while loading with transformers' ``from_pretrained``.

Import it explicitly (``import nf4lib.hf``): it registers the ``"nf4lib"`` quantization
method with transformers' public registration API (``register_quantization_config`` /
``register_quantizer``)::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4lib.hf.NF4Config(double_quant=True))

transformers builds the model on the meta device, :class:`NF4Quantizer` turns its
``nn.Linear`` and ``Conv1D`` layers (but ``exclude``) into empty :class:`~nf4lib.NF4Linear` layers, and
each weight is quantized as the loader reads it, so the full-precision model never
exists. The loaded model's config then records bitsandbytes' ``quantization_config``
(NF4/FP4), so its ``save_pretrained`` output loads with transformers + bitsandbytes, or
with :func:`nf4lib.load_quantized`. Loading a pre-quantized checkpoint through this
method is not supported (use those two).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.spec import QuantSpec, settings
from ..ops.quantize import quantize
from ..transforms.plan import DEFAULT_EXCLUDE, plan_modules
from ..transforms.tree import run_hooks
from ..weight.linear import NF4Linear, is_conv1d
from ..weight.tensor import NF4Tensor, check_compute_dtype
from .transformers_config import dequantize_in_place

__all__ = ["NF4Config", "NF4Quantizer"]


@register_quantization_config("nf4lib")
class NF4Config(QuantizationConfigMixin):
    """``from_pretrained(..., quantization_config=NF4Config(...))``: what :func:`nf4lib.convert` takes.

    Args:
        exclude: module names or globs kept in full precision (default ``("lm_head",)``).
        blocksize, code, double_quant, scale: as in :func:`nf4lib.quantize` (``code`` a
            name; ``scale="mse"`` searches each block's scale, same checkpoint format).
        compute_dtype: the matmul dtype; default: the dtype the model loads in.
        spec: the four settings as one :class:`nf4lib.QuantSpec` (its code a name).
    """

    def __init__(self, exclude=DEFAULT_EXCLUDE, blocksize: int = 64, code: str = "nf4", double_quant: bool = False,
                 compute_dtype: Optional[torch.dtype] = None, scale: str = "absmax", spec: Optional[QuantSpec] = None, **kwargs):
        self.quant_method = "nf4lib"
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"exclude must be a sequence of module names or globs, got {exclude!r}")
        name = code if spec is None else spec.code
        if not isinstance(name, str) or name.lower() not in ("nf4", "fp4", "int4"):
            raise ValueError(f"code must be 'nf4', 'fp4' or 'int4' (a config is JSON: no codebook tensor), got {name!r}")
        spec = settings(spec, "NF4Config", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
        self.exclude = list(exclude)
        self.blocksize, self.code, self.double_quant, self.scale = spec.blocksize, spec.code, spec.double_quant, spec.scale
        if isinstance(compute_dtype, str):
            compute_dtype = getattr(torch, compute_dtype)
        self.compute_dtype = None if compute_dtype is None else str(check_compute_dtype(compute_dtype)).replace("torch.", "")

    @property
    def spec(self) -> QuantSpec:
        """The four quantization settings as one :class:`nf4lib.QuantSpec`."""
        return QuantSpec(blocksize=self.blocksize, code=self.code, double_quant=self.double_quant, scale=self.scale)


class _QuantizeOnLoad(ConversionOps):
    """One full-precision weight, as the loader read it, to the NF4Linear's 4-bit Parameter."""

    def __init__(self, quantizer: "NF4Quantizer"):
        self.quantizer = quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        out = {}
        cfg = self.quantizer.quantization_config
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer = model.get_submodule(name.rpartition(".")[0])
            if layer in self.quantizer.transposed:  # a Conv1D's (in, out) weight: quantize W.T, as bitsandbytes does
                value = value.t().contiguous()
            q = quantize(value.detach(), spec=cfg.spec)
            w = NF4Tensor.from_quantized(q, dtype=layer.compute_dtype, code_name=cfg.code)
            layer._is_hf_initialized = True  # transformers' own flag: this module's weights are set
            layer.awaiting_weight = False
            out[name] = nn.Parameter(w, requires_grad=False)
        return out


@register_quantizer("nf4lib")
class NF4Quantizer(HfQuantizer):
    """transformers' quantizer for :class:`NF4Config` (quantize on load)."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            raise ValueError(
                "nf4lib quantizes full-precision checkpoints while loading; a checkpoint already in 4 bits loads with "
                "nf4lib.load_quantized (or transformers + bitsandbytes, from the bitsandbytes config it carries)"
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, attr = param_name.rpartition(".")
        return attr == "weight" and isinstance(model.get_submodule(module_name), NF4Linear)

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        compute = getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else None
        candidates = plan_modules(model, tuple(cfg.exclude)).layers
        if not candidates:
            warnings.warn(f"nf4lib.hf: no layer of this {type(model).__name__} is quantized: it has no nn.Linear or "
                          f"Conv1D outside exclude={list(cfg.exclude)!r}; it loads in full precision", stacklevel=2)
        self.transposed = set()  # layers that replace a Conv1D (the checkpoint holds their weight transposed)
        for name, lin in sorted(candidates.values(), key=lambda c: c[0]):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            # on the meta device from_linear quantizes nothing: an empty layer of the right layout
            layer = NF4Linear.from_linear(lin, spec=cfg.spec, compute_dtype=compute, layer_name=name)
            layer.awaiting_weight = True
            if is_conv1d(lin):
                self.transposed.add(layer)
            setattr(parent, child, layer)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # runs after transformers set config.quantization_config = NF4Config: replaced here by
        # bitsandbytes' config, so save_pretrained output loads with transformers + bitsandbytes
        return run_hooks("quantized", model)

    def param_element_size(self, model, param_name: str, param) -> float:
        # transformers' device-map planning and allocator warm-up count each parameter as
        # numel * element size: a 4-bit weight's is its stored bytes per weight (~0.56)
        if isinstance(param, NF4Tensor):
            return param.element_size()
        return super().param_element_size(model, param_name, param)

    def _dequantize(self, model, dtype=None):
        # model.dequantize(): every NF4Linear back to nn.Linear, in place, as transformers
        # does for bitsandbytes (nf4lib.dequantize_model returns a new tree instead)
        return dequantize_in_place(model, dtype)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)
