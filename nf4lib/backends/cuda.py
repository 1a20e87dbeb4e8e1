"""CUDA: the Triton kernel family (dequantize + matmul fallback without Triton)."""

import torch

from . import triton_kernels

torch.library.register_kernel("nf4lib::quantized_linear", "cuda", triton_kernels.forward)
