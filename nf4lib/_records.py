"""Layer 2: the immutable records of quantized data, registered as pytrees.

Tensors are pytree children; shape, dtype and blocksize are static context, so
``torch.func.vmap`` and ``torch.compile`` see only tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch
import torch.utils._pytree as pytree

__all__ = ["QuantizedTensor", "DoubleQuantized"]


@dataclasses.dataclass(frozen=True)
class DoubleQuantized:
    """8-bit quantized absmax (QLoRA double quantization), bitsandbytes layout.

    ``absmax[i] ~= code[codes[i]] * scales[i // blocksize] + offset``

    Attributes:
        codes: uint8 ``(n_blocks,)``, one code per 4-bit block.
        scales: float32 ``(ceil(n_blocks / blocksize),)``, absmax of each group of codes.
        offset: float32 0-dim tensor, the mean of the absmax vector (subtracted first).
        code: float32 ``(256,)``, the signed 8-bit dynamic map the codes index.
        blocksize: codes per scale (256 in bitsandbytes).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    blocksize: int = 256

    def to(self, device, *, copy: bool = False) -> "DoubleQuantized":
        """A record on ``device`` (this one is never changed); ``copy=True`` copies the
        tensors even where they already are, as ``Tensor.to(copy=True)`` does."""
        return dataclasses.replace(
            self,
            codes=self.codes.to(device, copy=copy),
            scales=self.scales.to(device, copy=copy),
            offset=self.offset.to(device, copy=copy),
            code=self.code.to(device, copy=copy),
        )


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A 4-bit blockwise-quantized tensor, stored as bitsandbytes stores it.

    Element ``i`` of the row-major flattened tensor is in block ``i // blocksize`` and
    in byte ``i // 2`` of ``packed`` (even ``i`` in the high nibble):

        ``w[i] ~= code[nibble(i)] * absmax[i // blocksize]``

    Attributes:
        packed: uint8 ``(ceil(numel / 2),)``, two 4-bit codes per byte.
        absmax: float32 ``(ceil(numel / blocksize),)`` or a :class:`DoubleQuantized`.
        code: float32 ``(<= 16,)`` codebook in storage order.
        shape: the original shape.
        dtype: the original dtype (fp32, fp16 or bf16).
        blocksize: elements per absmax block.

    Example:
        >>> q = nf4lib.quantize(torch.randn(64, 64))
        >>> q2 = dataclasses.replace(q, blocksize=q.blocksize)  # records are rebuilt, never mutated
    """

    packed: torch.Tensor
    absmax: Union[torch.Tensor, DoubleQuantized]
    code: torch.Tensor
    shape: tuple
    dtype: torch.dtype
    blocksize: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, DoubleQuantized)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device, *, copy: bool = False) -> "QuantizedTensor":
        """A record with every tensor on ``device``; ``copy=True`` copies them even where
        they already are, as ``Tensor.to(copy=True)`` does."""
        return dataclasses.replace(
            self,
            packed=self.packed.to(device, copy=copy),
            absmax=self.absmax.to(device, copy=copy),
            code=self.code.to(device, copy=copy),
        )


def _flatten_q(q: QuantizedTensor):
    return [q.packed, q.absmax, q.code], (tuple(q.shape), q.dtype, q.blocksize)


def _unflatten_q(children, context) -> QuantizedTensor:
    shape, dtype, blocksize = context
    return QuantizedTensor(children[0], children[1], children[2], shape, dtype, blocksize)


def _flatten_dq(d: DoubleQuantized):
    return [d.codes, d.scales, d.offset, d.code], d.blocksize


def _unflatten_dq(children, blocksize) -> DoubleQuantized:
    return DoubleQuantized(*children, blocksize=blocksize)


pytree.register_pytree_node(
    QuantizedTensor,
    _flatten_q,
    _unflatten_q,
    serialized_type_name="nf4lib.QuantizedTensor",
    flatten_with_keys_fn=lambda q: (
        [(pytree.GetAttrKey(k), v) for k, v in zip(("packed", "absmax", "code"), _flatten_q(q)[0])],
        _flatten_q(q)[1],
    ),
)
pytree.register_pytree_node(
    DoubleQuantized,
    _flatten_dq,
    _unflatten_dq,
    serialized_type_name="nf4lib.DoubleQuantized",
    flatten_with_keys_fn=lambda d: (
        [(pytree.GetAttrKey(k), v) for k, v in zip(("codes", "scales", "offset", "code"), _flatten_dq(d)[0])],
        d.blocksize,
    ),
)
