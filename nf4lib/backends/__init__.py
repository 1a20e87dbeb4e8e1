"""Layer 4: device kernels for ``nf4lib::quantized_linear``, one file per device.

``default`` (every device) is the readable pure-torch reference the others are tested
against; importing this package registers it and the CPU, CUDA and XPU kernels. Each
kernel takes ``(x, q: QuantizedTensor, bias)``; ``_ops.register_kernel`` adapts it to
the op's schema.
"""

from . import default, cpu, cuda, xpu  # noqa: F401  (registration side effects)
