"""Run a CPU loop in two halves, the second on one helper thread.

Dequantizing gathers from a 256-entry pair table with ``index_select``, which runs on
one core whatever ``torch.get_num_threads()`` says; only the multiply after it is
parallel. torch releases the GIL inside its ops, so a helper thread taking the second
half of the blocks puts a second core on the gathers: 1.3-1.6x on a 2-core machine
for a 4096x4096 weight. Only large CPU outputs go this way (see ``eager``).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import torch

__all__ = ["run_halves"]

_lock = threading.Lock()
_pool = {"pid": None, "executor": None}


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    with _lock:
        # A forked child (a DataLoader worker) inherits the object but not its thread.
        if _pool["pid"] != os.getpid():
            _pool["executor"] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nf4lib")
            _pool["pid"] = os.getpid()
        return _pool["executor"]


def run_halves(work, lo: int, hi: int, align: int) -> None:
    """``work(lo, mid)`` here and ``work(mid, hi)`` on the helper thread, ``mid - lo`` a
    multiple of ``align``; returns when both are done, raising the first error."""
    mid = lo + (hi - lo) // 2 // align * align
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def second_half():
        # grad and inference mode are per thread: writing into a tensor made under
        # inference_mode is only allowed inside it
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(mid, hi)

    future = _executor().submit(second_half)
    try:
        work(lo, mid)
    except BaseException:
        concurrent.futures.wait([future])  # never return while the helper still writes
        raise
    future.result()
