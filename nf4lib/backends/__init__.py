"""Kernels of the three ops, one folder per device, all registered the same way
(``ops.library.register_kernel``):

* ``default``: every device without its own; readable pure PyTorch, the reference the
  others are tested against;
* ``cpu``: the native C kernels, with an eager fallback;
* ``triton``: CUDA and XPU.

Importing this package registers them all.
"""

from . import default, cpu, triton  # noqa: F401  (registration side effects)
