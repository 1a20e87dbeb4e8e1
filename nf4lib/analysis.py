"""``nf4lib.analysis``: Quantization-error analysis of tensors and models (see ``nf4lib.tools.analysis``)."""

from .tools.analysis import *  # noqa: F401,F403
from .tools.analysis import __all__  # noqa: F401
