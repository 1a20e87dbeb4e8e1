"""Layer 4: device kernels for ``nf4lib::quantized_linear``, one file per device.

``default`` is the readable pure-torch reference the others are tested against;
importing this package registers the CPU, CUDA and XPU kernels.
"""

from . import cpu, cuda, xpu  # noqa: F401  (registration side effects)
