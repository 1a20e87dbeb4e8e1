"""The immutable records of quantized data, registered as pytrees.

Tensors are pytree children; shape, dtype and blocksize are static context, so
``torch.func.vmap`` and ``torch.compile`` see only tensors.

The per-block scale of a 4-bit weight is stored one of two ways: a float32 absmax per
block (:class:`PlainAbsmax`), or that vector itself quantized to 8 bits
(:class:`DoubleQuantized`). Both answer the same small interface, so no caller asks
which one it holds:

    ``dequantize()`` -> float32 ``(n_blocks,)``;  ``n_blocks``;  ``stored_bits``;
    ``to(device, copy=)``;  ``op_parts()`` (the op's arguments)

Records are checked in one place, ``nf4lib.ops.quantize.validate``, at the door of the kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.utils._pytree as pytree

__all__ = ["QuantizedTensor", "DoubleQuantized", "PlainAbsmax", "block_scales", "scales_from_parts"]


@dataclasses.dataclass(frozen=True)
class PlainAbsmax:
    """One float32 absmax per 4-bit block: ``absmax_f32[i] = values[i]``."""

    values: torch.Tensor

    @property
    def per_block(self) -> torch.Tensor:
        """The tensor with one entry per block (what bitsandbytes saves as ``.absmax``)."""
        return self.values

    @property
    def n_blocks(self) -> int:
        return self.values.numel()

    @property
    def stored_bits(self) -> int:
        return 32 * self.values.numel()

    def dequantize(self) -> torch.Tensor:
        return self.values

    def to(self, device, *, copy: bool = False) -> torch.Tensor:
        # A plain absmax lives in records as the bare tensor.
        return self.values.to(device, copy=copy)

    def op_parts(self) -> dict:
        return {"absmax": self.values}


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

    @property
    def per_block(self) -> torch.Tensor:
        return self.codes

    @property
    def n_blocks(self) -> int:
        return self.codes.numel()

    @property
    def stored_bits(self) -> int:
        # codes, one float32 scale per group, the float32 offset (the map is a shared constant)
        return 8 * self.codes.numel() + 32 * self.scales.numel() + 32

    def dequantize(self) -> torch.Tensor:
        """float32 absmax: ``code[codes] * scales[i // blocksize] + offset``."""
        n = self.codes.numel()
        pad = (-n) % self.blocksize
        values = self.code[self.codes.long()]
        scaled = torch.nn.functional.pad(values, (0, pad)).view(-1, self.blocksize) * self.scales[:, None]
        return scaled.reshape(-1)[:n] + self.offset

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

    def op_parts(self) -> dict:
        return {
            "absmax": self.codes,
            "nested_absmax": self.scales,
            "nested_quant_map": self.code,
            "nested_offset": self.offset,
            "nested_blocksize": self.blocksize,
        }


Absmax = Union[torch.Tensor, DoubleQuantized]


def block_scales(absmax: Absmax) -> Union[PlainAbsmax, DoubleQuantized]:
    """The scale interface for a record's ``absmax`` field (a tensor or a DoubleQuantized)."""
    return absmax if isinstance(absmax, DoubleQuantized) else PlainAbsmax(absmax)


def scales_from_parts(
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_quant_map: Optional[torch.Tensor] = None,
    nested_offset: Optional[torch.Tensor] = None,
    nested_blocksize: Optional[int] = None,
) -> Absmax:
    """A record's ``absmax`` field from its loose parts (the op's arguments, a state dict)."""
    if nested_absmax is None:
        return absmax
    return DoubleQuantized(absmax, nested_absmax, nested_offset, nested_quant_map, nested_blocksize or 256)


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
    absmax: Absmax
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
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, DoubleQuantized)

    @property
    def scales(self) -> Union[PlainAbsmax, DoubleQuantized]:
        """The per-block scales through their common interface (see the module docstring)."""
        return block_scales(self.absmax)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device, *, copy: bool = False) -> "QuantizedTensor":
        """A record with every tensor on ``device``; ``copy=True`` copies them even where
        they already are, as ``Tensor.to(copy=True)`` does."""
        return dataclasses.replace(
            self,
            packed=self.packed.to(device, copy=copy),
            absmax=self.scales.to(device, copy=copy),
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
