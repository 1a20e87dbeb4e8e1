"""``nf4lib.hf``: transformers integration: ``NF4Config`` and its quantizer (see ``nf4lib.integrations.hf``)."""

from .integrations.hf import *  # noqa: F401,F403
from .integrations.hf import __all__  # noqa: F401
