"""Intel GPUs (XPU, native ``torch.xpu``, PyTorch >= 2.5): the same Triton kernel family
as CUDA, registered on the XPU dispatch key. Intel Extension for PyTorch is not used."""

from .._ops import register_kernel
from . import triton_kernels

register_kernel("xpu")(triton_kernels.linear)
