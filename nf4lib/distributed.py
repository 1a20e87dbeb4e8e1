"""``nf4lib.distributed``: FSDP2 helpers: loading a quantized checkpoint on rank 0 and sharding it (see ``nf4lib.integrations.distributed``)."""

from .integrations.distributed import *  # noqa: F401,F403
from .integrations.distributed import __all__  # noqa: F401
