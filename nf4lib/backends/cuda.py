"""CUDA: the Triton kernel family (dequantize + matmul fallback without Triton)."""

from .._ops import register_kernel
from . import triton_kernels

register_kernel("cuda")(triton_kernels.linear)
