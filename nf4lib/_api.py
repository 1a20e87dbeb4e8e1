"""The public names of ``nf4lib`` (``__init__`` imports this on first use; see there)."""

from ._codebooks import fp4_levels, int4_levels, nf4_levels, normal_float_levels
from ._double import double_dequantize, double_quantize, dynamic_map
from ._quant import bits_per_parameter, dequantize, quantize
from ._records import DoubleQuantized, QuantizedTensor
from ._ops import quantized_linear
from ._interop import from_bnb, to_bnb
from ._tensor import NF4Tensor
from ._linear import NF4Linear
from ._convert import convert, dequantize_model
from ._checkpoint import load_quantized, save_quantized
from . import analysis
from . import backends  # noqa: F401  (registers the device kernels)

__all__ = [
    "nf4_levels", "normal_float_levels", "fp4_levels", "int4_levels", "dynamic_map", "QuantizedTensor",
    "DoubleQuantized", "quantize", "dequantize", "double_quantize", "double_dequantize", "bits_per_parameter",
    "quantized_linear", "NF4Tensor", "NF4Linear", "convert", "dequantize_model", "from_bnb", "to_bnb",
    "save_quantized", "load_quantized", "analysis",
]
