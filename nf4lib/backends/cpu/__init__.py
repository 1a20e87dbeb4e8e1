"""CPU kernels: the native C library (``native``, sources in ``csrc/``) and its eager
fallback (``eager``), registered by ``kernels``."""

from . import kernels  # noqa: F401  (registration side effects)
