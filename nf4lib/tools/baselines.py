"""Affine (asymmetric) group-wise INT4: the INT4 people use, computed by the libraries that define it.

GPTQ, AWQ, HQQ, torchao's ``Int4WeightOnlyConfig`` and llama.cpp's Q4_1 all store affine INT4:
codes 0..15, and a scale and a zero point per group of ``g`` consecutive weights of a row. In the
float zero-point domain torchao's int4 weight-only path uses (tinygemm's layout)::

    scale = (max - min) / 15            zero = min + 8 * scale          # both stored in bf16
    q = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)
    w ~= (q - 8) * scale + zero

so ``4 + 32/g`` bits per weight: at the same ``g`` exactly what NF4 stores with its float32 absmax.
HQQ (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023) keeps that
layout and optimises the zero point (and so the error) per group with a half-quadratic solver.

This module adds no runtime dependency: each baseline imports its library when it runs, and
:meth:`Affine.missing` says why it cannot (the analysis then skips that column with a note).

Groups here are the blocks NF4 uses: ``g`` consecutive elements of the flattened tensor (for a
weight whose rows are a multiple of ``g`` long, ``g`` consecutive inputs of one row, as above). A
last, partial group is padded with copies of its own last element, which changes neither its
minimum nor its maximum.

Example:
    >>> from nf4lib.tools.baselines import Affine
    >>> w_hat, bits = Affine("int4-affine").reconstruct(torch.randn(256, 256), 64)   # bits == 4.5
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import NamedTuple, Optional

import torch

__all__ = ["Affine", "AFFINE_METHODS"]

AFFINE_METHODS = {
    "minmax": "torchao",  # torchao.quantization.quant_primitives, the tinygemm float zero-point domain
    "hqq": "hqq",  # hqq.core.quantize.Quantizer, optimize=True
}
_META_BITS = 16 + 16  # bf16 scale + bf16 zero point per group
_CHUNK_GROUPS = 1 << 16  # groups per call: bounded working memory for any tensor size


class Affine(NamedTuple):
    """One affine INT4 baseline.

    Attributes:
        name: the label its records carry (``"int4-affine"``, ``"int4-hqq"``).
        method: ``"minmax"`` (torchao's min/max quantizer, what ``Int4WeightOnlyConfig``
            stores) or ``"hqq"`` (HQQ's optimised zero points, the ``hqq`` package).
    """

    name: str
    method: str = "minmax"

    def missing(self) -> Optional[str]:
        """Why this baseline cannot run here (its library is not installed), or ``None``."""
        if self.method not in AFFINE_METHODS:
            raise ValueError(f"Affine method must be one of {sorted(AFFINE_METHODS)}, got {self.method!r}")
        try:
            _primitives(self.method)  # importing torchao takes seconds: once per process
        except ImportError as e:
            return (f"{self.name} needs the '{AFFINE_METHODS[self.method]}' package, which cannot be imported "
                    f"here ({e}); pip install nf4lib[baselines]")
        return None

    def reconstruct(self, x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, float]:
        """Quantize and dequantize ``x`` in groups of ``blocksize``.

        Args:
            x: a floating point tensor, any shape.
            blocksize: elements per group (the ``g`` above).

        Returns:
            ``(x_hat, bits_per_param)``: a float32 tensor of ``x``'s shape, and the stored bits per
            element (4 per code plus 32 per group: a bf16 scale and a bf16 zero point).
        """
        quant = _primitives(self.method)
        n = x.numel()
        flat = x.detach().reshape(-1).float()
        groups = -(-n // blocksize)
        if groups * blocksize != n:  # edge padding: the last group's min and max are unchanged
            flat = torch.cat([flat, flat[-1:].expand(groups * blocksize - n)])
        rows = flat.view(groups, blocksize)
        out = torch.empty_like(rows)
        for s in range(0, groups, _CHUNK_GROUPS):
            out[s : s + _CHUNK_GROUPS] = quant(rows[s : s + _CHUNK_GROUPS], blocksize)
        bits = (4 * n + _META_BITS * groups) / max(n, 1)
        return out.view(-1)[:n].view(x.shape), bits


@functools.lru_cache(maxsize=None)
def _primitives(method: str):
    with _quiet("torchao", "torch.utils._pytree", "hqq"):
        return _minmax() if method == "minmax" else _hqq()


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Hold these loggers at ERROR while a baseline's library imports: torchao logs a warning
    per GPU extension a CPU build cannot load, which would land in every report."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _minmax():
    # torchao's int4 weight-only path computes its qparams with these (the float zero-point domain);
    # they are private there, and the public choose_qparams_affine keeps an integer zero point instead
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )

    def run(rows: torch.Tensor, g: int) -> torch.Tensor:
        block = (1, g)
        scale, zero = _choose_qparams_affine_tinygemm(
            rows, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, None, torch.bfloat16, torch.bfloat16)
        q = _quantize_affine_tinygemm(rows, list(block), scale, zero, torch.int32, 0, 15)
        return _dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.float32)

    return run


def _hqq():
    from hqq.core.quantize import Quantizer

    def run(rows: torch.Tensor, g: int) -> torch.Tensor:
        # axis=1: one group per row of ``rows``, i.e. g consecutive weights, as NF4's blocks
        q, meta = Quantizer.quantize(rows, nbits=4, group_size=g, optimize=True, axis=1, bitpack=False,
                                     compute_dtype=torch.float32, device=str(rows.device), round_zero=False)
        # HQQ optimises in float32; HQQLinear stores scale and zero in the 16-bit compute dtype
        meta = dict(meta, scale=meta["scale"].bfloat16().float(), zero=meta["zero"].bfloat16().float())
        return Quantizer.dequantize(q, meta).float().view(rows.shape)

    return run
