"""The name pickled NF4 weights refer to: ``torch.save`` writes ``nf4lib._tensor._rebuild_nf4``
into every file holding an :class:`nf4lib.NF4Tensor`, so this path stays stable while the
package's layout changes. The function lives in ``nf4lib.weight.tensor``."""

from .weight.tensor import _rebuild_nf4  # noqa: F401
