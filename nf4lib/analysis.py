"""``nf4lib.analysis``: quantization error of tensors, layers' outputs and models
(``nf4lib.tools.analysis``, ``nf4lib.tools.outputs``; the baselines in ``nf4lib.tools.baselines``)."""

from .tools.analysis import *  # noqa: F401,F403
from .tools.analysis import __all__ as _weights
from .tools.outputs import *  # noqa: F401,F403
from .tools.outputs import __all__ as _outputs

__all__ = [*_weights, *_outputs]
