"""Layer 2: fused kernels for large tensors, built with torch.compile (inductor, C++ on CPU).

Eager PyTorch needs ~8 passes over memory to quantize (bucketize alone runs at
~0.05 Gelem/s on 2 cores); one fused loop reads each value once. These functions
compute exactly what the eager code in ``_quant`` does (the tests hold them equal);
if compiling fails (no C++ compiler), nf4lib warns once and stays eager.
Set ``NF4LIB_COMPILE=0`` to never compile.
"""

from __future__ import annotations

import os
import warnings

import torch

_state = {"broken": False}
_compiled = {}


def enabled() -> bool:
    return os.environ.get("NF4LIB_COMPILE", "1") != "0" and not _state["broken"]


def _quantize_rows_impl(rows: torch.Tensor, thresholds: torch.Tensor, to_storage: torch.Tensor | None):
    rows = rows.float()
    absmax = rows.abs().amax(dim=1)
    scaled = (rows * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    # bucketize against the 15 (+inf padded) thresholds, unrolled so inductor fuses it:
    # q = #{t : t < s}, i.e. a value on a threshold goes to the lower level.
    q = (scaled > thresholds[0]).to(torch.int32)
    for k in range(1, 15):
        q = q + (scaled > thresholds[k]).to(torch.int32)
    if to_storage is not None:  # only FP4's storage order is unsorted; the gather costs ~2x
        q = to_storage[q].to(torch.int32)
    q = q.reshape(-1, 2)
    return ((q[:, 0] << 4) | q[:, 1]).to(torch.uint8), absmax


def _get(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def quantize_rows(rows, thresholds, to_storage, identity: bool):
    try:
        return _get("quantize_rows", _quantize_rows_impl)(rows, thresholds, None if identity else to_storage)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _state["broken"] = True
        warnings.warn(f"nf4lib: torch.compile unavailable ({type(err).__name__}: {err}); using eager kernels")
        from ._quant import _quantize_rows

        return _quantize_rows(rows, thresholds, to_storage, identity)
