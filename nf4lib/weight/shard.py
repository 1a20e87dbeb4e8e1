"""An NF4 weight in row shards, and the FSDP2 all-gather contract.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter on dim 0 with
``torch.chunk``, stores each rank's piece in a tensor made by ``new_zeros`` and
``narrow(...).copy_``, and before each forward and backward all-gathers the pieces. For
an NF4 weight a row range is a range of whole 4-bit blocks, so a shard is itself an NF4
weight: the rows' bytes of ``packed``, their entries of ``absmax`` (and of
``nested_absmax`` when double-quantized), and the whole (replicated) codebooks and
double-quantization offset::

    rows [r0, r1) of an (out, in) weight = elements [r0*in, r1*in)
      packed  bytes  [r0*in/2, r1*in/2)
      absmax  blocks [r0*in/bs, r1*in/bs)                 w ~= code[q] * absmax[block]
      nested  groups [r0*in/(bs*256), r1*in/(bs*256))     absmax ~= map8[c] * nested[group] + offset

This module holds the shard arithmetic and the two FSDP2 hooks as a mixin of
:class:`~nf4lib.NF4Tensor`; it does not import that class (``tensor`` imports this).

Which shapes shard: a weight of shape ``(out, in)`` shards over ``world`` ranks when
``out % world == 0`` and each shard, ``(out // world) * in`` weights, is a whole number
of blocks (``blocksize``), and of 256-block groups (``256 * blocksize`` weights) when
double-quantized. Anything else raises ``ValueError`` naming the layer (when known), the
shape and the shard size, before any collective runs. FSDP2 pads an uneven last shard;
nf4lib does not, because FSDP2 then requires every all-gather input to have the outer
padded shape, which 4-bit bytes cannot have.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..formats.bnb import quant_state_tensor, read_quant_state, to_bnb

__all__ = ["ShardableMixin", "shard_unit", "check_shardable"]

_GROUP = 256  # bitsandbytes' nested blocksize: the absmax codes are double-quantized per 256 blocks
_SHARDED = ("packed", "absmax", "nested_absmax")  # split by rows; the rest is replicated


def shard_unit(blocksize: int, nested_blocksize: Optional[int]) -> int:
    """The number of weights a shard must be a multiple of."""
    return blocksize * (nested_blocksize or 1)


def _label(w) -> str:
    name = getattr(w, "layer_name", None)
    return f"NF4 weight {name!r}" if name else "an NF4 weight"


def check_shardable(w, rows: int, what: str) -> None:
    """Raise ``ValueError`` unless ``w`` splits into equal shards of ``rows`` rows of whole blocks (groups)."""
    out_f, in_f = w.shape
    lay = w.qlayout
    unit = shard_unit(lay.blocksize, lay.nested_blocksize)
    if rows > 0 and out_f % rows == 0 and (rows * in_f) % unit == 0:
        return
    if rows <= 0 or out_f % rows:
        why = f"{out_f} rows do not split into equal shards of {rows} (FSDP2 would pad the last one, which 4-bit data cannot be)"
    else:
        dq = f" x {lay.nested_blocksize}-block groups" if lay.nested_blocksize else ""
        why = f"a shard of {rows} x {in_f} = {rows * in_f} weights is not a whole number of blocks ({lay.blocksize} weights{dq} = {unit})"
    raise ValueError(
        f"{what}: cannot shard {_label(w)} of shape ({out_f}, {in_f}): {why}. Over N ranks an NF4 weight shards when "
        f"N divides out_features and (out_features / N) * in_features is a multiple of {unit}; otherwise exclude "
        f"this layer from convert(), or from fully_shard (its ignored_params)"
    )


def _spans(w, r0: int, r1: int) -> dict:
    """``{field: (start, stop)}`` of the rows ``[r0, r1)`` of an untransposed 2-D ``w``."""
    in_f = w.shape[1]
    lay = w.qlayout
    e0, e1 = r0 * in_f, r1 * in_f
    b0, b1 = e0 // lay.blocksize, -(-e1 // lay.blocksize)
    spans = {"packed": (e0 // 2, -(-e1 // 2)), "absmax": (b0, b1)}
    if lay.nested_blocksize:
        spans["nested_absmax"] = (b0 // lay.nested_blocksize, -(-b1 // lay.nested_blocksize))
    return spans


def on_blocks(w, r0: int, r1: int) -> bool:
    """Whether rows ``[r0, r1)`` of ``w`` start and end on a block (group) boundary or the end."""
    out_f, in_f = w.shape
    unit = shard_unit(w.qlayout.blocksize, w.qlayout.nested_blocksize)
    return all(r == out_f or (r * in_f) % unit == 0 for r in (r0, r1))


def row_slice(w, r0: int, r1: int) -> dict:
    """The inner tensors of rows ``[r0, r1)`` of ``w`` (views; replicated fields shared);
    the rows must be :func:`on_blocks`."""
    spans = _spans(w, r0, r1)
    inner = w._inner()
    return {k: (t[spans[k][0]:spans[k][1]] if k in spans else t) for k, t in inner.items()}


def zeros_inner(w, rows: int) -> dict:
    """Inner tensors of a ``(rows, in)`` weight of ``w``'s layout that dequantizes to exact zeros."""
    inner = w._inner()
    n = rows * w.shape[1]
    spans = _spans(w, 0, rows) if n else {k: (0, 0) for k in _SHARDED}
    new = {}
    for k, t in inner.items():
        if k in _SHARDED:
            new[k] = t.new_zeros(spans[k][1] - spans[k][0])
        elif k == "nested_offset":
            new[k] = torch.zeros_like(t)  # absmax = map8[0] * 0 + 0 = 0, so w = 0
        else:
            new[k] = t.clone()
    return new


class ShardableMixin:
    """FSDP2's all-gather extension for NF4 weights (``fsdp_pre_all_gather`` /
    ``fsdp_post_all_gather``, the 5-argument form).

    Each rank contributes its shard's ``packed`` (uint8), ``absmax`` (float32, or uint8
    codes when double-quantized) and ``nested_absmax`` (float32) as tensors of their own
    dtype: FSDP2 all-gathers mixed dtypes as raw bytes, so no 4-bit byte is ever
    reinterpreted as a float (which is how padding 4-bit data into bf16 storage corrupts
    it: NaN bit patterns get canonicalised). The codebooks and the offset are the same on
    every rank and are not sent. With ``MixedPrecisionPolicy(param_dtype=bf16)`` the
    gathered weight computes in bf16; its 4-bit data is the same bytes.
    """

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        if self.qlayout.transposed:
            raise ValueError(f"FSDP2 cannot shard a transposed view of {_label(self)}; shard the (out, in) weight")
        inputs = tuple(getattr(self, k) for k in _SHARDED if getattr(self, k) is not None)
        replicated = {k: t for k, t in self._inner().items() if k not in _SHARDED}
        return inputs, (tuple(outer_size), replicated)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata: Any, param_dtype: torch.dtype, *, out=None):
        outer_size, replicated = metadata
        gathered = dict(zip(_SHARDED, all_gather_outputs))
        if out is not None:
            # A later all-gather: FSDP2 refilled the same storages the unsharded weight
            # views, so there is nothing to build. Copy only if someone swapped them.
            for k, t in gathered.items():
                dst = getattr(out, k)
                if dst.data_ptr() != t.data_ptr():
                    dst.copy_(t)
            return None
        inner = {**replicated, **gathered}
        full = type(self)(inner, self.qlayout, torch.Size(outer_size), param_dtype)
        return full, tuple(gathered.values())


# ----------------------------------------------------------------------------- state dicts
# Under FSDP2 a layer's weight is a DTensor over this rank's NF4 shard. Its state dict
# keeps bitsandbytes' keys: the row-sharded fields become DTensors of plain uint8/float32
# shards (Shard(0) over the same mesh), the codebooks and the JSON stay plain (replicated).
# The shards are contiguous byte ranges of the full fields, so DCP saves and reshards
# them as any tensor, and gathering them (full_tensor) yields bitsandbytes' exact bytes.

def local_nf4(w):
    """This rank's NF4Tensor when ``w`` is a DTensor over one, else None."""
    local = getattr(w, "_local_tensor", None)
    return local if local is not None and hasattr(local, "qlayout") else None


def _row_offset(w) -> int:
    """The first global row of this rank's shard of the DTensor ``w``."""
    mesh, coord, index = w.device_mesh, w.device_mesh.get_coordinate(), 0
    for d, p in enumerate(w.placements):
        if p.is_shard(0):
            index = index * mesh.size(d) + coord[d]
        elif not p.is_replicate():
            raise ValueError(f"an NF4 weight shards on rows only (Shard(0)), got placements {w.placements}")
    return index * w._local_tensor.shape[0]


def copy_rows_into(dst, src) -> None:
    """Copy ``src`` (a DTensor like ``dst``, or a full tensor) into the DTensor ``dst``'s shard."""
    if hasattr(src, "to_local"):
        dst.copy_(src)
        return
    local = dst.to_local()
    r0 = _row_offset(dst)
    local.copy_(src[r0:r0 + local.shape[0]])


def _field_keys(wkey: str) -> dict:
    return {wkey: "packed", wkey + ".absmax": "absmax", wkey + ".nested_absmax": "nested_absmax"}


def sharded_bnb_entries(w, wkey: str) -> dict:
    """bitsandbytes entries of a DTensor NF4 weight: sharded fields as DTensors."""
    from torch.distributed.tensor import DTensor

    local = local_nf4(w)
    q = local.quantized
    entries = to_bnb(type(q)(q.packed, q.absmax, q.code, tuple(w.shape), q.dtype, q.blocksize), wkey, code_name=local.qlayout.code_name)
    full = _spans(local, 0, w.shape[0])  # the whole weight's field sizes (in_features is shared)
    for key, field in _field_keys(wkey).items():
        if key in entries:
            shape = (full[field][1], 1) if field == "packed" else (full[field][1],)  # packed: bitsandbytes' (n/2, 1)
            stride = (1, 1) if len(shape) == 2 else (1,)
            entries[key] = DTensor.from_local(entries[key], w.device_mesh, w.placements, run_check=False, shape=shape, stride=stride)
    return entries


def local_bnb_entries(w, entries: dict, wkey: str, js_key: str) -> dict:
    """The bitsandbytes entries of this rank's rows of the DTensor NF4 weight ``w``.

    ``entries`` may hold DTensors (a sharded state dict, as DCP loads it) or full tensors
    (a full state dict given to every rank); the JSON's shape must be ``w``'s and is
    rewritten to the shard's, so the result reads with ``from_bnb`` as the shard.
    """
    local = local_nf4(w)
    r0 = _row_offset(w)
    spans = _spans(local, r0, r0 + local.shape[0])  # the global rows' ranges (in_features and layout are shared)
    full = _spans(local, 0, w.shape[0])
    out = {}
    for key, v in entries.items():
        field = _field_keys(wkey).get(key)
        if local_nf4(v) is None and hasattr(v, "to_local"):
            v = v.to_local()
        elif field is not None and field in spans:
            if v.shape[0] == full[field][1]:  # a full tensor: take this rank's rows
                v = v[spans[field][0]:spans[field][1]]
        out[key] = v
    meta = read_quant_state(out[js_key])
    if tuple(meta.get("shape", ())) != tuple(w.shape):
        raise ValueError(f"size mismatch for {wkey}: the checkpoint holds a weight of shape {tuple(meta.get('shape', ()))}, this layer's is {tuple(w.shape)}")
    meta["shape"] = list(local.shape)
    out[js_key] = quant_state_tensor(meta)
    return out
