"""Layer 5: whole-model checkpoints in safetensors.

The file holds ``model.state_dict()`` (so NF4 layers appear under bitsandbytes' keys),
plus the non-persistent buffers (rotary tables and the like) so that a model built on
the meta device can be filled from the file alone. Tensors that share storage (a tied
embedding and head, a codebook shared by every layer) are written once; the metadata
entry ``nf4lib.aliases`` maps each other name to the one written.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn


__all__ = ["save_quantized", "load_quantized"]

_ALIASES = "nf4lib.aliases"
_NON_PERSISTENT = "nf4lib.non_persistent"


def _chmod_like_new_file(path: str) -> None:
    # mkstemp creates 0600; give the result the mode open() would have (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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
    from safetensors.torch import save_file

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
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nf4lib-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(to_write, tmp, metadata=meta)
        _chmod_like_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_quantized(model: nn.Module, path, *, strict: bool = True, device="cpu") -> nn.Module:
    """Fill ``model`` from a file written by :func:`save_quantized`, in place, and return it.

    Build the skeleton without full-precision weights (``with torch.device("meta"):``
    build the model, then :func:`nf4lib.convert` it with the settings of the file); every
    tensor is then taken from the file, read one at a time. Tied parameters stay tied.

    Args:
        model: a model of the checkpoint's architecture, on the meta device or not.
        path: the safetensors file.
        strict: as in ``load_state_dict``: missing or unexpected keys are an error.
        device: where the loaded tensors go.

    Returns:
        ``model`` itself (this loads in place, like ``Module.load_state_dict``).

    Raises:
        FileNotFoundError, ValueError: no such file, not a safetensors file, or tensors
            left on the meta device; RuntimeError from ``load_state_dict`` naming keys
            whose shapes do not fit.
    """
    from safetensors import safe_open

    if not isinstance(model, nn.Module):
        raise TypeError(f"load_quantized expects an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path!r}")
    try:
        f = safe_open(path, framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    with f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for alias, source in json.loads(meta.get(_ALIASES, "{}")).items():
        tensors[alias] = tensors[source]
    extra = {k: tensors.pop(k) for k in json.loads(meta.get(_NON_PERSISTENT, "[]")) if k in tensors}

    # Remember which modules share one Parameter, to tie them again after assigning.
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod, pname))
    model.load_state_dict(tensors, strict=strict, assign=True)
    for members in groups.values():
        first_mod, first_name = members[0]
        for mod, pname in members[1:]:
            mod._parameters[pname] = first_mod._parameters[first_name]
    for name, t in extra.items():
        mod_name, _, buf = name.rpartition(".")
        model.get_submodule(mod_name)._buffers[buf] = t
    _init_missing_buffers(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{len(left)} tensors are still on the meta device after loading {path!r}, e.g. {left[:3]}")
    return model
