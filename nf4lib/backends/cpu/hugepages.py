"""Large CPU output buffers backed by 2 MiB pages where Linux allows it.

A fresh 32 MiB tensor (a dequantized 4096x4096 bf16 weight) is first touched page by
page; with 4 KiB pages that is 8,192 page faults, ~15 ms on a 2-core machine, about
as long as dequantizing itself. Asking for transparent huge pages
(``madvise(MADV_HUGEPAGE)``, what PyTorch's own ``THP_MEM_ALLOC_ENABLE=1`` does for
every allocation) cuts that to 16 faults. The memory is an ordinary ``torch.empty``
tensor either way; where the call is unavailable (not Linux, THP off) nothing changes.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

__all__ = ["empty_large"]

# Below this the faults cost little and a 2 MiB page could not fit inside the buffer.
_MIN_BYTES = 4 << 20
_PAGE = mmap.PAGESIZE
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)
_madvise = None  # resolved on first use: a ctypes function, or False where unavailable


def _resolve():
    global _madvise
    if _madvise is None:
        _madvise = False
        if _ADVICE is not None:
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
            except (OSError, AttributeError):
                return _madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
    return _madvise


def empty_large(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(n, dtype=dtype, device=device)``; on CPU, when the buffer is large,
    its whole pages are marked for transparent huge pages before anything touches them."""
    out = torch.empty(n, dtype=dtype, device=device)
    nbytes = n * out.element_size()
    if out.device.type != "cpu" or nbytes < _MIN_BYTES:
        return out
    madvise = _resolve()
    if madvise:
        # madvise wants a page-aligned start; advise the whole pages inside the buffer only.
        start = -(-out.data_ptr() // _PAGE) * _PAGE
        end = (out.data_ptr() + nbytes) // _PAGE * _PAGE
        madvise(start, end - start, _ADVICE)  # a refusal (EINVAL, THP off) just leaves 4 KiB pages
    return out
