"""Intel GPUs (XPU, native ``torch.xpu``, PyTorch >= 2.5): the same Triton kernel family
as CUDA, registered on the XPU dispatch key. Intel Extension for PyTorch is not used."""

import torch

from . import triton_kernels

torch.library.register_kernel("nf4lib::quantized_linear", "xpu", triton_kernels.forward)
