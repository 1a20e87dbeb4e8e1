"""Fuse an eager kernel with torch.compile (inductor, C++ on CPU) for large tensors.

Eager PyTorch needs ~8 passes over memory to quantize (one per elementwise op); one
fused loop reads each value once. :func:`compiled` takes the eager function itself, so
there is one kernel to read and the compiled form cannot drift from it. If compiling
fails (no C++ compiler), nf4lib warns once and runs the eager function from then on.
Set ``NF4LIB_COMPILE=0`` to never compile.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

_state = {"broken": False}


def enabled() -> bool:
    return os.environ.get("NF4LIB_COMPILE", "1") != "0" and not _state["broken"]


def compiled(fn):
    """``fn`` compiled (dynamic shapes) on first call; ``fn`` itself once compiling failed."""
    cache = {}

    @functools.wraps(fn)
    def run(*args):
        if not enabled():
            return fn(*args)
        try:
            if "fn" not in cache:
                cache["fn"] = torch.compile(fn, dynamic=True)
            return cache["fn"](*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            _state["broken"] = True
            warnings.warn(f"nf4lib: torch.compile unavailable ({type(err).__name__}: {err}); using eager kernels")
            return fn(*args)

    return run
