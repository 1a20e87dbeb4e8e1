"""Intel GPUs (XPU, native ``torch.xpu``, PyTorch >= 2.5): the same Triton kernel family
as CUDA, registered on the XPU dispatch key and for ``dequantize`` / ``quantize`` on XPU.
Intel Extension for PyTorch is not used."""

from .._ops import register_kernel
from .._quant import register_device_kernels
from . import triton_kernels

register_kernel("xpu")(triton_kernels.linear)
register_device_kernels("xpu", triton_kernels.dequantize, triton_kernels.quantize_into)
