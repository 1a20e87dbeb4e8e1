"""CUDA: the Triton kernel family for all three ops (the default kernels where Triton is missing)."""

from . import kernels

kernels.register("cuda")
