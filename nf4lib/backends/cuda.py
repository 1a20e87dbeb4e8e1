"""CUDA: the Triton kernel family for ``quantized_linear``, ``dequantize`` and ``quantize``
(PyTorch fallbacks where Triton is missing)."""

from .._ops import register_kernel
from .._quant import register_device_kernels
from . import triton_kernels

register_kernel("cuda")(triton_kernels.linear)
register_device_kernels("cuda", triton_kernels.dequantize, triton_kernels.quantize_into)
