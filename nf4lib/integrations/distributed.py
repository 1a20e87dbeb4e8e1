"""Distributed QLoRA helpers (FSDP2 and ``torch.distributed.checkpoint``).

Import it explicitly (``import nf4lib.distributed``); ``import nf4lib`` does not load
``torch.distributed.checkpoint``.

What works without anything from here: ``fully_shard`` of a converted model (NF4 weights
shard by rows, see :class:`nf4lib.NF4Tensor`), ``model.state_dict()`` (bitsandbytes keys,
the sharded fields as DTensors), ``dcp.save``, ``get_model_state_dict(...,
full_state_dict=True)`` (bitsandbytes ``Linear4bit`` keys and bytes), and
``model.load_state_dict`` of a sharded or a full state dict.

What is here:

* :class:`LoadPlanner`: ``dcp.load`` of double-quantized weights into a model that does
  not already hold them (the JSON entry's length depends on the double-quantization
  offset, and DCP refuses tensors whose size changed).
* :func:`load_from_rank0`: the low-memory start. Every rank builds the model on the meta
  device, converts and shards it; only ``src`` reads the checkpoint (full precision,
  quantized on the fly one tensor at a time, or already 4-bit), and every rank keeps
  only its shard of each tensor.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

__all__ = ["LoadPlanner", "load_from_rank0", "peft_base_key"]


class LoadPlanner(DefaultLoadPlanner):
    """``dcp.load(sd, checkpoint_id=..., planner=LoadPlanner())``: DCP's default planner,
    except that each ``*.quant_state.*`` JSON entry is resized to the saved one first.

    The JSON bitsandbytes writes for a double-quantized weight holds the offset as a
    decimal float, so its length varies with the value; DCP loads tensors in place and
    refuses a size change. The entry is a standalone tensor made by ``state_dict()``
    (not a parameter), so resizing it in place is safe.
    """

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for key, value in self.state_dict.items():
            md = metadata.state_dict_metadata.get(key) if metadata is not None else None
            if ".quant_state." in key and isinstance(md, TensorStorageMetadata) and isinstance(value, torch.Tensor):
                if value.size() != md.size:
                    value.resize_(md.size)


def peft_base_key(key: str) -> str:
    # PEFT wraps the model (base_model.model.) and each adapted layer (.base_layer.)
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return key.replace(".base_layer.", ".")


class _Checkpoint:
    """Tensors by name from safetensors files or a mapping, one at a time (on ``src`` only).

    Files are read with plain reads into a fresh tensor (no memory map), so the process
    never holds more than the tensor asked for."""

    def __init__(self, source):
        from ..formats.safetensors import checkpoint_files, index

        self.mapping = source if isinstance(source, Mapping) else None
        self.index = {} if self.mapping is not None else index(checkpoint_files(source))

    def keys(self) -> Iterable[str]:
        return self.mapping.keys() if self.mapping is not None else self.index.keys()

    def find(self, key: str) -> Optional[str]:
        names = self.keys()
        for k in (key, peft_base_key(key)):
            if k in names:
                return k
        return None

    def get(self, name: str) -> torch.Tensor:
        from ..formats.safetensors import read_tensor

        return self.mapping[name] if self.mapping is not None else read_tensor(self.index[name], name)


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc only; elsewhere nothing).

    Quantizing a layer allocates and frees tens of MB of temporaries per tensor; glibc
    keeps freed chunks below its mmap threshold in the heap, so without a trim rank 0's
    resident memory climbs by about a layer's temporaries per layer (measured: 645 MiB
    instead of 307 MiB above start for a 1.2 GiB model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``), or None."""
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _nf4_groups(model: torch.nn.Module) -> dict:
    """``{"<prefix>weight": NF4Linear}`` for every NF4Linear in ``model``."""
    from ..weight.linear import NF4Linear

    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def _source_entries(ckpt: _Checkpoint, wkey: str, layer) -> Optional[dict]:
    """On ``src``: the full bitsandbytes entries of one NF4 layer, read or quantized."""
    from ..formats.bnb import to_bnb
    from ..ops.quantize import quantize

    name = ckpt.find(wkey)
    if name is None:
        return None
    entries = {k: ckpt.get(k) for k in ckpt.keys() if k.startswith(name + ".quant_state.")}
    if entries:  # already 4-bit (nf4lib or bitsandbytes): take it as it is
        for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
            if name + suffix in ckpt.keys():
                entries[name + suffix] = ckpt.get(name + suffix)
        return {wkey + k[len(name):]: v for k, v in entries.items()}
    w = ckpt.get(name)
    if not w.is_floating_point():
        raise ValueError(f"{name!r} is a {w.dtype} tensor without a quant_state entry: neither a float weight nor a 4-bit one")
    local = layer._nf4()
    lay = local.qlayout
    if lay.code_name not in ("nf4", "fp4", "int4"):
        raise ValueError(f"{wkey!r} uses a user codebook: load it from a 4-bit checkpoint, not a full-precision one")
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"size mismatch for {wkey!r}: the checkpoint's {name!r} is {tuple(w.shape)}, the layer is ({layer.out_features}, {layer.in_features})")
    q = quantize(w.to(lay.qdtype), blocksize=lay.blocksize, code=lay.code_name, double_quant=lay.nested_blocksize is not None)
    del w
    return to_bnb(q, wkey, code_name=lay.code_name)


def load_from_rank0(model: torch.nn.Module, checkpoint=None, *, src: int = 0, strict: bool = True, group=None):
    """Fill a model (FSDP2-sharded or not) from a checkpoint that only rank ``src`` reads.

    The low-memory start for QLoRA: every rank builds the model on the meta device,
    converts it (``nf4lib.convert``), applies adapters, ``fully_shard``-s it and calls
    ``model.to_empty(device=...)``; then every rank calls this. Rank ``src`` goes through
    the model's state-dict keys in order and for each one reads the checkpoint's tensor
    (quantizing a full-precision NF4Linear weight with that layer's settings, or taking
    its 4-bit entries as they are) and broadcasts it; each rank copies its own shard out
    and drops the rest. No rank ever holds more than one full tensor beyond its shards,
    and none holds the full-precision model.

    Without an initialised process group it simply loads (one process), so the same code
    runs single-process.

    Args:
        model: the model, every tensor allocated (not meta).
        checkpoint: on ``src``: a safetensors file, a Hugging Face model directory, or a
            mapping of full tensors (a full-precision or bitsandbytes / nf4lib 4-bit state
            dict). Ignored on the other ranks. Keys of a PEFT-wrapped model are looked up
            under their unwrapped names too (without ``base_model.model.`` and ``.base_layer``).
        src: the rank that reads.
        strict: as ``load_state_dict``; with ``strict=False`` the keys the checkpoint lacks
            (LoRA adapters, say) keep their values and are reported as missing.
        group: the process group (default: the world).

    Returns:
        ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.

    Raises:
        ValueError: a tensor of the model is still on the meta device, or a checkpoint
            tensor does not fit (raised on ``src`` and, as a broadcast error, on every rank).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    alone = not (dist.is_available() and dist.is_initialized())  # one process: just load
    rank = src if alone else dist.get_rank(group)
    local_sd = model.state_dict()
    meta = [k for k, v in local_sd.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise ValueError(f"load_from_rank0: {len(meta)} tensors are on the meta device (first: {meta[0]!r}); call model.to_empty(device=...) first")
    ckpt = _Checkpoint(checkpoint) if rank == src else None
    groups = _nf4_groups(model)
    cache: dict = {}
    for key in list(local_sd):
        target = local_sd[key]
        info = full = None
        if rank == src:
            try:
                full, exact = _full_tensor(ckpt, key, groups, local_sd, cache)
                # 4-bit entries keep their dtype (uint8 codes, float32 scales); the rest
                # takes the model's dtype
                info = None if full is None else ("ok", tuple(full.shape), full.dtype if exact else target.dtype)
            except (ValueError, TypeError, KeyError) as e:
                info = ("error", f"{key!r}: {e}")
        if not alone:
            box = [info]
            dist.broadcast_object_list(box, src=src, group=group)
            info = box[0]
        if info is None:
            del local_sd[key]  # not in the checkpoint: load_state_dict reports it missing
            continue
        if info[0] == "error":
            raise ValueError(f"load_from_rank0: {info[1]}")
        _, shape, dtype = info
        if rank == src:
            buf = full.to(device=target.device, dtype=dtype).contiguous()
        else:
            buf = torch.empty(shape, dtype=dtype, device=target.device)
        full = None
        if not alone:
            dist.broadcast(buf, src=src, group=group)
        if isinstance(target, DTensor):
            if tuple(target.shape) != shape:
                raise ValueError(f"load_from_rank0: size mismatch for {key!r}: the checkpoint's is {shape}, the model's {tuple(target.shape)}")
            piece = distribute_tensor(buf, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(piece.to_local())  # this rank's shard; the rest is dropped
        else:
            local_sd[key] = buf
        del buf
    with torch.no_grad():
        return model.load_state_dict(local_sd, strict=strict)


def _full_tensor(ckpt: _Checkpoint, key: str, groups: dict, local_sd: dict, cache: dict):
    """On ``src``: ``(full tensor or None, is a 4-bit entry)`` for a model state-dict key."""
    if key in cache:
        return cache.pop(key), True
    if key in groups:  # an NF4 layer's first key: read or quantize the layer once
        entries = _source_entries(ckpt, key, groups[key])
        _trim_heap()
        if entries is None:
            return None, True
        local_js = [k for k in local_sd if k.startswith(key + ".quant_state.")]
        ckpt_js = [k for k in entries if k.startswith(key + ".quant_state.")]
        if local_js and ckpt_js and local_js != ckpt_js:  # e.g. nf4lib__nf4 in the file, bitsandbytes__nf4 here
            entries[local_js[0]] = entries.pop(ckpt_js[0])
        cache.clear()  # leftovers of a layer whose keys differ from the checkpoint's
        cache.update(entries)
        return cache.pop(key), True
    name = ckpt.find(key)
    return (None, False) if name is None else (ckpt.get(name), False)
