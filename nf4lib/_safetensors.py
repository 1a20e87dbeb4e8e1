"""Layer 5: safetensors files, read and written tensor by tensor: the one reader and writer
behind ``save_quantized`` / ``load_quantized``, the command line and ``load_from_rank0``.

Reading parses the header once (checking that the file holds every byte it promises), then
either memory-maps the file and copies out one tensor at a time, dropping its pages after
(:func:`iter_tensors`), or reads one named tensor with plain reads (:func:`read_tensor`).
Writing streams each tensor's bytes to a temporary file as it is produced, then writes
the header and the data to a second temporary file that is renamed over the output
(:class:`StreamingWriter`, :func:`write_file`): memory stays at about one tensor whatever
the checkpoint's size, and an error or interruption never leaves a partial output file.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from typing import Iterator, NamedTuple

import torch

from ._errors import CheckpointError

__all__ = ["CheckpointError", "Entry", "checkpoint_files", "read_header", "index", "index_file", "iter_tensors", "read_tensor",
           "StreamingWriter", "write_file"]

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


class Entry(NamedTuple):
    """Where one tensor lies: ``path``, its dtype and shape, and its bytes' absolute offset and length."""

    path: str
    dtype: torch.dtype
    shape: tuple
    offset: int
    nbytes: int


def _chmod_like_new_file(path: str) -> None:
    # mkstemp creates 0600; give the result the mode open() would have (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def checkpoint_files(path) -> list[str]:
    """The safetensors files of ``path``: the file itself, or every ``*.safetensors`` in a
    Hugging Face model directory (sharded checkpoints included), sorted."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors file in this directory")
        return files
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    return [path]


def _parse_header(path: str) -> tuple[dict, dict, int]:
    """``({name: (dtype, shape, (begin, end))}, metadata, data_start)``, checking that the
    file holds every byte the header promises."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    info, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
            lo, hi = int(lo), int(hi)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype not in _FROM_ST or not 0 <= lo <= hi or hi - lo != numel * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: malformed header entry for {name!r} ({dtype} {shape} at [{lo}, {hi}))")
        info[name] = (dtype, shape, (lo, hi))
        end = max(end, hi)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header needs {8 + n + end} bytes, the file has {size}")
    return info, metadata, 8 + n


def read_header(path: str) -> tuple[dict, dict]:
    """``({name: (dtype_str, shape)}, metadata)`` from a safetensors header (no tensor is read)."""
    info, metadata, _ = _parse_header(path)
    return {k: (dt, sh) for k, (dt, sh, _) in info.items()}, metadata


def index_file(path) -> tuple[dict[str, Entry], dict]:
    """``({name: Entry}, metadata)`` of one file, from its header only."""
    path = os.fspath(path)
    info, metadata, start = _parse_header(path)
    entries = {name: Entry(path, _FROM_ST[dt], tuple(shape), start + lo, hi - lo)
               for name, (dt, shape, (lo, hi)) in info.items()}
    return entries, metadata


def index(files) -> dict[str, Entry]:
    """``{name: Entry}`` over several files (a sharded checkpoint), from their headers only."""
    out = {}
    for path in files:
        out.update(index_file(path)[0])
    return out


def read_tensor(entry: Entry, name: str = "") -> torch.Tensor:
    """One tensor, read with plain reads into a fresh tensor (no memory map: the process
    holds only this tensor, whatever the file's size)."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        with open(entry.path, "rb") as f:
            f.seek(entry.offset)
            if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != entry.nbytes:
                raise CheckpointError(f"{entry.path}: truncated while reading {name!r}")
    return t


def iter_tensors(files: list[str], names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, in file then storage order.

    Each file is memory-mapped; a tensor is copied out of the mapping and its pages are
    then dropped (``MADV_DONTNEED``), so resident memory stays at about one tensor
    however large the checkpoint is.
    """
    page = mmap.PAGESIZE
    for path in files:
        info, _, data_start = _parse_header(path)
        wanted = sorted(((lo, hi, name, dt, sh) for name, (dt, sh, (lo, hi)) in info.items()
                         if names is None or name in names))
        if not wanted:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            for lo, hi, name, dt, shape in wanted:
                a, b = data_start + lo, data_start + hi
                if a == b:
                    t = torch.empty(shape, dtype=_FROM_ST[dt])
                else:
                    with memoryview(mm)[a:b] as region:
                        t = torch.frombuffer(region, dtype=_FROM_ST[dt]).clone().reshape(shape)
                    if hasattr(mm, "madvise"):
                        start = a - a % page
                        mm.madvise(mmap.MADV_DONTNEED, start, b - start)
                yield name, t


class StreamingWriter:
    """Write a safetensors file tensor by tensor; nothing appears at ``path`` until
    :meth:`commit`. Use as a context manager: leaving it by an exception removes the
    temporary files.

    Example:
        >>> with StreamingWriter("out.safetensors") as w:
        ...     w.add("x", torch.zeros(3)); w.commit({"format": "pt"})
    """

    def __init__(self, path) -> None:
        self.path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{path}: the output directory {folder} does not exist")
        stem = "." + os.path.basename(self.path) + ".nf4lib-"
        try:
            fd, self._data_path = tempfile.mkstemp(prefix=stem, suffix=".data", dir=folder)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot write in {folder} ({e.strerror})") from None
        self._data = os.fdopen(fd, "wb")
        self._final_path = None
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._committed = False

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._entries:
            raise CheckpointError(f"tensor name {name!r} written twice")
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name!r}: dtype {t.dtype} has no safetensors name")
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        self._data.write(raw.numpy().data)
        n = raw.numel()
        self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def commit(self, metadata: dict[str, str]) -> None:
        self._data.close()
        header = {"__metadata__": dict(metadata), **self._entries}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        fd, self._final_path = tempfile.mkstemp(prefix=os.path.basename(self._data_path), suffix=".out", dir=os.path.dirname(self.path))
        with os.fdopen(fd, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 24)
            out.flush()
            os.fsync(out.fileno())
        _chmod_like_new_file(self._final_path)
        os.replace(self._final_path, self.path)
        self._final_path = None
        os.unlink(self._data_path)
        self._committed = True

    def abort(self) -> None:
        self._data.close()
        for p in (self._data_path, self._final_path):
            if p and os.path.exists(p):
                os.unlink(p)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:  # an exception, an interruption, or no commit: leave nothing
            self.abort()


def write_file(tensors: dict, path, metadata: dict[str, str]) -> None:
    """Write ``{name: tensor}`` to ``path`` atomically (see :class:`StreamingWriter`)."""
    with StreamingWriter(path) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.commit(metadata)
