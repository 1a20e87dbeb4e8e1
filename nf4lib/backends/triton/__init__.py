"""Triton kernels for CUDA and XPU (one family: Triton targets both). ``cuda`` and ``xpu``
register them, each explicitly, on its device."""

from . import cuda, xpu  # noqa: F401  (registration side effects)
