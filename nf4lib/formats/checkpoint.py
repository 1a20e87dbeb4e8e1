"""Whole-model checkpoints in safetensors.

The file holds ``model.state_dict()`` (so NF4 layers appear under bitsandbytes' keys),
plus the non-persistent buffers (rotary tables and the like) so that a model built on
the meta device can be filled from the file alone. Tensors that share storage (a tied
embedding and head, a codebook shared by every layer) are written once; the metadata
entry ``nf4lib.aliases`` maps each other name to the one written.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .bnb import from_bnb
from .safetensors import CheckpointError, index_file, read_tensor, write_file


__all__ = ["save_quantized", "load_quantized"]

_ALIASES = "nf4lib.aliases"
_NON_PERSISTENT = "nf4lib.non_persistent"


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for b in mod._non_persistent_buffers_set:
            t = mod._buffers.get(b)
            if t is not None:
                out[f"{mod_name}.{b}" if mod_name else b] = t
    return out


def _init_missing_buffers(model: nn.Module, device) -> None:
    """Compute the non-persistent buffers a file lacks (``rotary_emb.inv_freq``,
    ``position_ids``: bitsandbytes' and the CLI's files do not store them) with the
    model's own initialiser, for a skeleton built on the meta device.

    Only Hugging Face models say how to (``_init_weights(module)``); it runs on the
    modules that hold such buffers, and their loaded parameters are put back after it.
    """
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    for mod in model.modules():
        missing = [b for b in mod._non_persistent_buffers_set if mod._buffers.get(b) is not None and mod._buffers[b].is_meta]
        if not missing:
            continue
        for b in missing:
            mod._buffers[b] = torch.empty_like(mod._buffers[b], device=device)
        params = {k: p for k, p in mod._parameters.items() if p is not None}
        saved = {k: p.detach().clone() for k, p in params.items() if not p.is_meta}
        with torch.no_grad():
            init(mod)
            for k, v in saved.items():  # the initialiser may write parameters: keep the loaded values
                mod._parameters[k].copy_(v)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_quantized(model: nn.Module, path, *, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` (converted or not) to one safetensors file, atomically.

    Written to a temporary file in the same directory, then renamed: an error or an
    interruption never leaves a partial ``path``.

    Args:
        model: the model; nothing in it is changed.
        path: the ``.safetensors`` file to write (replaced if it exists).
        metadata: extra string metadata to store in the header.

    Example:
        >>> nf4lib.save_quantized(nf4lib.convert(model), "model-nf4.safetensors")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_quantized expects an nn.Module, got {type(model).__name__}")
    tensors = dict(model.state_dict())
    extra = _non_persistent_buffers(model)
    tensors.update(extra)
    written: dict[tuple, str] = {}
    to_write, aliases = {}, {}
    for name, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"cannot save {name!r}: it is on the meta device (load or initialise the model first)")
        key = _storage_key(t)
        if key in written:
            aliases[name] = written[key]
        else:
            written[key] = name
            to_write[name] = t.detach().contiguous()
    meta = {"format": "pt", _ALIASES: json.dumps(aliases), _NON_PERSISTENT: json.dumps(sorted(extra))}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
        meta[k] = v
    write_file(to_write, path, meta)


def _read_layout_metadata(path: str, meta: dict, stored: dict) -> tuple[dict, list]:
    """The aliases (``{name: stored name}``) and non-persistent buffer names of a file's
    metadata, checked: an alias may only name a tensor the file does not store, and only
    point at one it does (else the loaded model would silently differ from the file)."""
    try:
        aliases = json.loads(meta.get(_ALIASES, "{}"))
        non_persistent = json.loads(meta.get(_NON_PERSISTENT, "[]"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path!r}: unreadable nf4lib metadata ({type(e).__name__})") from None
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{path!r}: metadata {_ALIASES!r} must map tensor names to tensor names")
    for alias, source in aliases.items():
        if alias in stored:
            raise ValueError(f"{path!r}: metadata {_ALIASES!r} names {alias!r}, which the file stores itself")
        if source not in stored:
            raise ValueError(f"{path!r}: metadata {_ALIASES!r} points {alias!r} at {source!r}, which the file does not store")
    if not isinstance(non_persistent, list) or not all(isinstance(k, str) for k in non_persistent):
        raise ValueError(f"{path!r}: metadata {_NON_PERSISTENT!r} must be a list of buffer names")
    return aliases, non_persistent


def _check_quantized_entries(path: str, tensors: dict) -> None:
    """Every 4-bit weight the file holds must read as a valid record (sizes, blocksizes,
    finite scales) before any of it is loaded: a ValueError naming the file and tensor."""
    for key in tensors:
        prefix, sep, _ = key.partition(".quant_state.")
        if sep:
            try:
                from_bnb(tensors, prefix)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path!r}: the 4-bit weight {prefix!r} is malformed: {e}") from None


def load_quantized(model: nn.Module, path, *, strict: bool = True, device="cpu"):
    """Fill ``model`` from a file written by :func:`save_quantized`, in place, as
    ``load_state_dict`` does.

    Build the skeleton without full-precision weights (``with torch.device("meta"):``
    build the model, then :func:`nf4lib.convert` it with the settings of the file); every
    tensor is then taken from the file, read one at a time. Tied parameters stay tied.
    Non-persistent buffers the file lacks (``rotary_emb.inv_freq``) are computed with the
    model's own initialiser.

    Args:
        model: a model of the checkpoint's architecture, on the meta device or not.
        path: the safetensors file.
        strict: as in ``load_state_dict``: missing or unexpected keys are an error. With
            ``strict=False`` they are returned, and what the file lacks stays as it was.
        device: where the loaded tensors go.

    Returns:
        ``NamedTuple(missing_keys, unexpected_keys)``, as ``Module.load_state_dict``
        returns (both empty when ``strict=True``).

    Raises:
        FileNotFoundError, ValueError: no such file, not a safetensors file, or (with
            ``strict=True``) tensors left on the meta device; RuntimeError from
            ``load_state_dict`` naming missing, unexpected or misshapen keys.

    Example:
        >>> with torch.device("meta"):
        ...     skeleton = nf4lib.convert(MyModel())
        >>> missing, unexpected = nf4lib.load_quantized(skeleton, "model-nf4.safetensors")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_quantized expects an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path!r}")
    try:
        entries, meta = index_file(path)
        tensors = {k: read_tensor(e, k).to(device) for k, e in entries.items()}
    except CheckpointError as e:
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    aliases, non_persistent = _read_layout_metadata(path, meta, tensors)
    _check_quantized_entries(path, tensors)
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    extra = {k: tensors.pop(k) for k in non_persistent if k in tensors}

    # Remember which modules share one Parameter, to tie them again after assigning.
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod, pname))
    result = model.load_state_dict(tensors, strict=strict, assign=True)
    for members in groups.values():
        first_mod, first_name = members[0]
        for mod, pname in members[1:]:
            mod._parameters[pname] = first_mod._parameters[first_name]
    for name, t in extra.items():
        mod_name, _, buf = name.rpartition(".")
        try:
            holder = model.get_submodule(mod_name)
        except AttributeError:
            holder = None
        if holder is None or buf not in holder._buffers:  # the model has no such buffer
            if strict:
                raise RuntimeError(f"Error(s) in loading {path!r}: Unexpected key(s): {name!r} (a buffer the model lacks)")
            result.unexpected_keys.append(name)
            continue
        holder._buffers[buf] = t
    _init_missing_buffers(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left and strict:
        raise ValueError(f"{len(left)} tensors are still on the meta device after loading {path!r}, e.g. {left[:3]}")
    return result
