"""Safetensors files, read and written tensor by tensor: the one reader and writer
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
import math
import mmap
import os
import tempfile
from typing import Iterator, NamedTuple

import torch
from safetensors import safe_open

from ..core.errors import CheckpointError

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


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate name {next(k for k in keys if keys.count(k) > 1)!r} in the header")
    return dict(pairs)


def _official_check(path: str) -> None:
    """The ``safetensors`` package's own reader must accept the file: it refuses overlapping,
    out-of-range or uncovered offsets, trailing bytes, non-integer offsets and dims,
    non-string metadata and sizes that overflow. Only its header is parsed (a memory map)."""
    try:
        with safe_open(path, framework="pt") as f:
            f.metadata()
    except Exception as e:  # noqa: BLE001 - SafetensorError, and OSError/ValueError from older versions
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _parse_header(path: str) -> tuple[dict, dict, int]:
    """``({name: (dtype, shape, (begin, end))}, metadata, data_start)``, checking that the
    file holds every byte the header promises, as strictly as the official reader does
    (it checks the file first; this parse is then held to the same rules and to unique names)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        _official_check(path)
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except RecursionError:
        raise CheckpointError(f"{path}: not a valid safetensors file (the header is nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map strings to strings")
    info, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
        if any(not _is_index(v) for v in [*shape, lo, hi]):
            raise CheckpointError(f"{path}: malformed header entry for {name!r} (dims and offsets must be non-negative integers)")
        if dtype not in _FROM_ST:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which nf4lib does not read")
        if not lo <= hi or hi - lo != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{path}: malformed header entry for {name!r} ({dtype} {shape} at [{lo}, {hi}))")
        info[name] = (dtype, shape, (lo, hi))
        spans.append((lo, hi, name))
    # the data section is exactly the tensors' bytes, each byte in one tensor (as the official reader requires)
    at = 0
    for lo, hi, name in sorted(spans):
        if lo != at:
            raise CheckpointError(f"{path}: tensor {name!r} starts at {lo}, expected {at} (overlapping or gapped offsets)")
        at = hi
    if 8 + n + at != size:
        raise CheckpointError(f"{path}: the header describes {8 + n + at} bytes, the file has {size}")
    return info, metadata, 8 + n


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


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
    temporary file.

    Each tensor's bytes go to one hidden temporary file beside ``path`` as they are added;
    :meth:`commit` then moves the data up by the header's length inside that same file
    (from the end down, a chunk at a time), writes the header in front and renames the
    file over ``path``. The disk needs the output's size plus one chunk, memory one tensor.
    A temporary file left by a killed writer (its process is gone) is removed by the next
    writer of the same output; one of a live process is left alone.

    Example:
        >>> with StreamingWriter("out.safetensors") as w:
        ...     w.add("x", torch.zeros(3)); w.commit({"format": "pt"})
    """

    _CHUNK = 16 << 20

    def __init__(self, path) -> None:
        self.path = os.path.abspath(os.fspath(path))
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{path}: the output directory {folder} does not exist")
        stem = "." + os.path.basename(self.path) + ".nf4lib-"
        _remove_stale(folder, stem)
        try:
            fd, self._tmp_path = tempfile.mkstemp(prefix=f"{stem}{os.getpid()}-", suffix=".tmp", dir=folder)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot write in {folder} ({e.strerror})") from None
        self._data = os.fdopen(fd, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._committed = False

    def _fail(self, e: OSError) -> CheckpointError:
        self.abort()
        return CheckpointError(f"{self.path}: cannot write ({e.strerror or e})")

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._entries:
            raise CheckpointError(f"tensor name {name!r} written twice")
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name!r}: dtype {t.dtype} has no safetensors name")
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        try:
            self._data.write(raw.numpy().data)
        except OSError as e:
            raise self._fail(e) from None
        n = raw.numel()
        self._entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def commit(self, metadata: dict[str, str]) -> None:
        header = {"__metadata__": dict(metadata), **self._entries}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        head = len(blob).to_bytes(8, "little") + blob
        try:
            self._data.close()
            with open(self._tmp_path, "r+b") as f:
                # move [0, D) to [H, H + D), last chunk first, so no byte is overwritten before it is read
                pos = self._offset
                while pos > 0:
                    c = min(self._CHUNK, pos)
                    f.seek(pos - c)
                    chunk = f.read(c)
                    f.seek(pos - c + len(head))
                    f.write(chunk)
                    pos -= c
                f.seek(0)
                f.write(head)
                f.flush()
                os.fsync(f.fileno())
            _chmod_like_new_file(self._tmp_path)
            os.replace(self._tmp_path, self.path)
        except OSError as e:
            raise self._fail(e) from None
        self._committed = True

    def abort(self) -> None:
        self._data.close()
        if os.path.exists(self._tmp_path):
            os.unlink(self._tmp_path)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:  # an exception, an interruption, or no commit: leave nothing
            self.abort()


def _remove_stale(folder: str, stem: str) -> None:
    """Remove ``<stem><pid>-*.tmp`` files whose writing process no longer exists."""
    try:
        names = [f for f in os.listdir(folder) if f.startswith(stem) and f.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(stem):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass  # another writer removed it, or we may not: harmless either way


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or an absurd number): leave its file alone
    return True


def write_file(tensors: dict, path, metadata: dict[str, str]) -> None:
    """Write ``{name: tensor}`` to ``path`` atomically (see :class:`StreamingWriter`)."""
    with StreamingWriter(path) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.commit(metadata)
