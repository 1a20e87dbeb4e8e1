"""Untrusted input: malformed records and crafted files get one clear error, never a crash.

Each case here once reached the native kernels unchecked (a read past a buffer, a shift
by 64, a silently wrong value) or escaped as an unclear exception. The mutation fuzzer at
the end feeds a few thousand damaged checkpoints through the public loaders.
"""

import io
import json
import os
import pickle
import random
import resource
import signal
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nf4lib
from nf4lib.weight.tensor import _rebuild_nf4  # the pickle's rebuild function: what a crafted file names

pytestmark = pytest.mark.security

LEVELS = nf4lib.nf4_levels()


def _record(**fields):
    q = nf4lib.quantize(torch.randn(8, 64))
    base = dict(packed=q.packed, absmax=q.absmax, code=q.code, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize)
    base.update(fields)
    return nf4lib.QuantizedTensor(**base)


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("fields, words", [
    (dict(packed=torch.zeros(1, dtype=torch.uint8), absmax=torch.ones(1), shape=(1 << 22, 64)), "packed"),
    (dict(absmax=torch.ones(3)), "absmax"),
    (dict(blocksize=0), "blocksize"),
    (dict(blocksize=8), "blocksize"),
    (dict(blocksize=48), "blocksize"),
    (dict(blocksize=1 << 20), "blocksize"),
    (dict(blocksize=True), "blocksize"),
    (dict(packed=torch.zeros(256, dtype=torch.int8)), "packed"),
    (dict(absmax=torch.ones(8, dtype=torch.float64)), "absmax"),
    (dict(code=torch.zeros(17)), "code"),
    (dict(code=torch.zeros(16, dtype=torch.int32)), "code"),
    (dict(shape=(-8, -64)), "shape"),
    (dict(shape=(8.0, 64)), "shape"),
    (dict(dtype=torch.int8), "dtype"),
    (dict(absmax="ones"), "absmax"),
])
def test_malformed_records_are_refused_by_every_way_in(fields, words):
    q = _record(**fields)
    x = torch.randn(2, q.shape[-1] if isinstance(q.shape[-1], int) and q.shape[-1] > 0 else 64)
    for call in (lambda: nf4lib.dequantize(q), lambda: nf4lib.quantized_linear(x, q)):
        with pytest.raises((ValueError, TypeError), match=words):
            call()


def test_the_op_itself_validates_what_it_is_given():
    q = nf4lib.quantize(torch.randn(8, 64))
    short = q.packed[:10]
    with pytest.raises(ValueError, match="packed"):
        torch.ops.nf4lib.quantized_linear(torch.randn(1, 64), short, q.absmax, q.code, 8, 64, 64)
    with pytest.raises(ValueError, match="absmax"):
        torch.ops.nf4lib.quantized_linear(torch.randn(1, 64), q.packed, q.absmax[:2], q.code, 8, 64, 64)
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.nf4lib.quantized_linear(torch.randn(1, 64), q.packed, q.absmax, q.code, 8, 64, 4)


def test_a_short_bias_is_refused_not_read_past():
    q = nf4lib.quantize(torch.randn(64, 64))
    with pytest.raises(ValueError, match="bias"):
        torch.ops.nf4lib.quantized_linear(torch.randn(1, 64), q.packed, q.absmax, q.code, 64, 64, 64, torch.ones(1))
    with pytest.raises(ValueError, match="bias"):
        nf4lib.quantized_linear(torch.randn(1, 64), q, torch.ones(1))


@pytest.mark.parametrize("nested_bs", [0, 1, 3, 1 << 17, 1 << 64])
def test_nested_blocksize_out_of_range_is_refused(nested_bs):
    q = nf4lib.quantize(torch.randn(64, 64), double_quant=True)
    bad = nf4lib.QuantizedTensor(q.packed, nf4lib.DoubleQuantized(q.absmax.codes, q.absmax.scales, q.absmax.offset,
                                                                  q.absmax.code, nested_bs), q.code, q.shape, q.dtype, 64)
    with pytest.raises(ValueError, match="nested"):
        nf4lib.quantized_linear(torch.randn(1, 64), bad)
    sd = nf4lib.to_bnb(q)
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta["nested_blocksize"] = nested_bs
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nested_blocksize"):
        nf4lib.from_bnb(sd)


def test_every_blocksize_the_kernels_accept_equals_the_pure_path():
    # the AVX-512 decode once assumed blocks of 16 or more while smaller ones were accepted
    from nf4lib.backends.cpu import native as _native

    for bs in _native.BLOCKSIZES:
        w = torch.randn(3, 2 * bs + 32)
        q = nf4lib.quantize(w, blocksize=bs)
        with _native.disabled():
            ref = nf4lib.dequantize(q)
        assert torch.equal(nf4lib.dequantize(q), ref), bs
    with pytest.raises(ValueError, match="blocksize"):
        nf4lib.quantize(torch.randn(64), blocksize=8)


def test_the_c_entry_points_refuse_buffers_too_short_themselves():
    from nf4lib.backends.cpu import native as _native

    if not _native.available():
        pytest.skip("no native library")
    q = nf4lib.quantize(torch.randn(64, 64))
    short = nf4lib.QuantizedTensor(q.packed[:100], q.absmax, q.code, q.shape, q.dtype, 64)  # never validated here
    with pytest.raises(ValueError, match="refused"):
        _native.decode_into(torch.empty(64 * 64), short)
    with pytest.raises(ValueError, match="refused"):
        _native.gemv(torch.randn(1, 64), short, torch.float32, None)
    with pytest.raises(ValueError, match="refused"):
        _native.gemv(torch.randn(1, 64), q, torch.float32, torch.ones(3))
    tiny = nf4lib.QuantizedTensor(q.packed, q.absmax, q.code, q.shape, q.dtype, 8)
    with pytest.raises(ValueError, match="refused"):
        _native.decode_into(torch.empty(64 * 64), tiny)
    with pytest.raises(ValueError, match="refused"):
        _native.quantize_into(torch.randn(64), 64, torch.zeros(15), None, torch.empty(2, dtype=torch.uint8), torch.empty(1))


# ----------------------------------------------------------------------------- pickles


class _Crafted:
    """Pickles as an NF4 weight with whatever fields it is given, as a crafted file would."""

    def __init__(self, inner, layout, shape, dtype=torch.float32, requires_grad=False):
        self.args = (inner, layout, shape, dtype, requires_grad)

    def __reduce_ex__(self, protocol):
        return (_rebuild_nf4, self.args)


def _good_fields():
    w = nf4lib.NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(64, 64)))
    inner = {"packed": w.packed, "absmax": w.absmax, "quant_map": w.quant_map}
    return inner, (64, None, torch.float32, "nf4", False), (64, 64)


def _load(obj):
    buf = io.BytesIO()
    torch.save({"w": obj}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["w"]


def _crafted_cases():
    inner, lay, shape = _good_fields()
    short = dict(inner, packed=inner["packed"][:1])
    yield "short packed", (short, lay, shape)
    yield "huge shape", (inner, lay, (1 << 22, 64))
    yield "blocksize 0", (inner, (0, None, torch.float32, "nf4", False), shape)
    yield "blocksize 8", (inner, (8, None, torch.float32, "nf4", False), shape)
    yield "nested 2**64", (dict(inner, nested_absmax=torch.ones(1), nested_quant_map=torch.ones(256),
                                nested_offset=torch.tensor(0.0), absmax=inner["packed"][:64]),
                           (64, 1 << 64, torch.float32, "nf4", False), shape)
    yield "nan absmax", (dict(inner, absmax=torch.full((64,), float("nan"))), lay, shape)
    yield "inf quant_map", (dict(inner, quant_map=torch.full((16,), float("inf"))), lay, shape)
    yield "3-D", (inner, lay, (4, 16, 64))
    yield "unknown part", (dict(inner, evil=torch.ones(1)), lay, shape)
    yield "layout short", (inner, (64,), shape)
    yield "int dtype", (inner, (64, None, torch.int32, "nf4", False), shape)


@pytest.mark.parametrize("case", [c for c, _ in _crafted_cases()])
def test_a_crafted_pickle_gives_a_clear_error_not_a_crash(case):
    args = dict(_crafted_cases())[case]
    with pytest.raises(pickle.UnpicklingError, match="not a valid NF4 weight"):
        _load(_Crafted(*args))


def test_a_genuine_pickle_still_loads_and_computes():
    w = nf4lib.NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(64, 64), double_quant=True))
    back = _load(w)
    x = torch.randn(3, 64)
    assert torch.equal(F.linear(x, back), F.linear(x, w))


# ----------------------------------------------------------------------------- bitsandbytes entries


def _bnb_sd(double_quant=False):
    return nf4lib.to_bnb(nf4lib.quantize(torch.randn(64, 64), double_quant=double_quant))


def _with_meta(sd, **changes):
    key = next(k for k in sd if ".quant_state." in k)
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(changes)
    out = dict(sd)
    out[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


@pytest.mark.parametrize("changes, words", [
    (dict(blocksize=0), "blocksize"),
    (dict(blocksize=64.0), "blocksize"),
    (dict(blocksize="64"), "blocksize"),
    (dict(shape=[64, -64]), "shape"),
    (dict(shape=[64.5, 64]), "shape"),
    (dict(shape="64x64"), "shape"),
    (dict(shape=[1 << 40, 1 << 40]), "bytes for shape"),
    (dict(dtype="int8"), "dtype"),
    (dict(nested_offset=float("nan")), "nested_offset"),
    (dict(nested_offset="0.5"), "nested_offset"),
    (dict(nested_offset=2 ** 70), "nested_offset"),
    (dict(nested_offset=1e30, dtype="float16"), "nested_offset"),
])
def test_crafted_quant_states_are_refused_naming_the_key(changes, words):
    sd = _with_meta(_bnb_sd(double_quant="nested_offset" in changes), **changes)
    with pytest.raises(ValueError, match=words):
        nf4lib.from_bnb(sd)
    layer = nf4lib.convert(nn.Sequential(nn.Linear(64, 64, bias=False)), exclude=())[0]
    sd = {k.replace("weight", "weight", 1): v for k, v in sd.items()}
    with pytest.raises(RuntimeError, match=words):  # nn.Module.load_state_dict's own error type
        layer.load_state_dict(sd)


@pytest.mark.parametrize("key, value, words", [
    ("weight.absmax", lambda t: torch.full_like(t, float("nan")), "NaN"),
    ("weight.quant_map", lambda t: torch.full_like(t, float("inf")), "NaN or Inf"),
    ("weight.absmax", lambda t: t[:-1], "absmax"),
    ("weight", lambda t: t.reshape(-1).view(torch.float32)[:10], "bytes"),
])
def test_crafted_bnb_tensors_are_refused(key, value, words):
    sd = _bnb_sd()
    sd[key] = value(sd[key])
    with pytest.raises(ValueError, match=words):
        nf4lib.from_bnb(sd)


def test_deep_or_non_object_quant_state_json_gives_value_error():
    sd = _bnb_sd()
    key = next(k for k in sd if ".quant_state." in k)
    for text in ("[" * 100000 + "]" * 100000, "[1, 2]", "\xff\xfe", "{\"shape\": [64, 64]"):
        bad = dict(sd)
        bad[key] = torch.tensor(list(text.encode("latin-1")), dtype=torch.uint8)
        with pytest.raises(ValueError):
            nf4lib.from_bnb(bad)


# ----------------------------------------------------------------------------- safetensors files


def _write_raw(path, header: str, data: bytes):
    h = header.encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


_U8 = '"dtype":"U8","shape":[2]'
_FILES = {
    "overlapping offsets": ('{"a":{%s,"data_offsets":[0,2]},"b":{%s,"data_offsets":[1,3]}}' % (_U8, _U8), b"1234"),
    "duplicate names": ('{"a":{%s,"data_offsets":[0,2]},"a":{%s,"data_offsets":[2,4]}}' % (_U8, _U8), b"1234"),
    "hole": ('{"a":{%s,"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]}}' % _U8, b"1234"),
    "trailing bytes": ('{"a":{%s,"data_offsets":[0,2]}}' % _U8, b"1234"),
    "float offset": ('{"a":{%s,"data_offsets":[0.0,2]}}' % _U8, b"12"),
    "string dim": ('{"a":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}}', b"12"),
    "float dim": ('{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"12"),
    "non-string metadata": ('{"__metadata__":{"x":1},"a":{%s,"data_offsets":[0,2]}}' % _U8, b"12"),
    "deep nesting": ('{"__metadata__":' + "[" * 100000 + "]" * 100000 + "}", b""),
    "offset 1e999": ('{"a":{%s,"data_offsets":[0,1e999]}}' % _U8, b"12"),
    "negative dim": ('{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}', b"12"),
    "huge dims": ('{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,2]}}', b"12"),
    "not an object": ("[1]", b""),
    "truncated": ('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}', b"12"),
}


@pytest.mark.parametrize("case", sorted(_FILES))
def test_files_the_official_reader_rejects_are_rejected(tmp_path, case, capsys):
    from safetensors import safe_open

    path = _write_raw(tmp_path / "x.safetensors", *_FILES[case])
    with pytest.raises(Exception):
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="x.safetensors"):
        nf4lib.load_quantized(model, path)
    from nf4lib.tools.cli import main

    for command in (["report", str(path)], ["quantize", str(path), str(tmp_path / "out.safetensors")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("nf4lib: error:") and len(err.strip().splitlines()) == 1 and "x.safetensors" in err, err
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


def _saved_model(tmp_path, double_quant=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    q = nf4lib.convert(model, exclude=(), double_quant=double_quant)
    path = tmp_path / "m.safetensors"
    nf4lib.save_quantized(q, path)
    return model, q, path


def _skeleton(double_quant=False):
    with torch.device("meta"):
        return nf4lib.convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), exclude=(), double_quant=double_quant)


def _rewrite(path, tensors: dict, metadata: dict):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def test_aliases_may_not_shadow_stored_tensors(tmp_path):
    from safetensors import safe_open

    _, _, path = _saved_model(tmp_path)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta = dict(meta, **{"nf4lib.aliases": json.dumps({"0.bias": "2.bias"})})
    _rewrite(path, tensors, meta)
    with pytest.raises(ValueError, match="stores itself"):
        nf4lib.load_quantized(_skeleton(), path)
    meta["nf4lib.aliases"] = json.dumps({"extra": "nowhere"})
    _rewrite(path, tensors, meta)
    with pytest.raises(ValueError, match="does not store"):
        nf4lib.load_quantized(_skeleton(), path)
    for bad in ("{", "[1]", json.dumps({"a": 1})):
        meta["nf4lib.aliases"] = bad
        _rewrite(path, tensors, meta)
        with pytest.raises(ValueError, match="nf4lib"):
            nf4lib.load_quantized(_skeleton(), path)


@pytest.mark.parametrize("key, value", [
    ("0.weight.absmax", lambda t: torch.full_like(t, float("nan"))),
    ("0.weight.quant_map", lambda t: torch.full_like(t, float("inf"))),
    ("0.weight", lambda t: t.reshape(-1).view(torch.float32)[:-1]),
    ("0.weight.absmax", lambda t: t[:3]),
    ("0.weight.absmax", lambda t: torch.full_like(t, 3e38) * 10),  # inf as float32
])
def test_load_quantized_refuses_crafted_4bit_entries_before_loading_anything(tmp_path, key, value):
    from safetensors import safe_open

    _, _, path = _saved_model(tmp_path)
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[key] = value(tensors[key])
    _rewrite(path, tensors, meta)
    skeleton = _skeleton()
    with pytest.raises(ValueError, match="'0.weight'"):
        nf4lib.load_quantized(skeleton, path)
    assert all(p.is_meta for p in skeleton.parameters())  # nothing was loaded


def test_the_writer_names_the_path_when_the_disk_is_full_and_leaves_nothing(tmp_path):
    # RLIMIT_FSIZE stands in for a full disk (a write past it fails with EFBIG/ENOSPC)
    src = tmp_path / "in.safetensors"
    from safetensors.torch import save_file

    save_file({"l.weight": torch.randn(512, 512)}, str(src))
    out = tmp_path / "out.safetensors"
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); "
        "from nf4lib.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    res = subprocess.run([sys.executable, "-c", code, "quantize", str(src), str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("nf4lib: error:") and str(out) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_the_writer_needs_only_the_output_size_on_disk(tmp_path):
    # one file the size of the output, not a data file plus a copy of it
    from nf4lib.formats.safetensors import write_file

    tensors = {"a": torch.randn(300, 300), "b": torch.arange(1000, dtype=torch.uint8)}
    probe = tmp_path / "probe.safetensors"
    write_file(tensors, probe, {"format": "pt"})
    size = probe.stat().st_size
    code = (
        "import resource, signal, sys, torch; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); "
        "from nf4lib.formats.safetensors import write_file; "
        "write_file({'a': torch.randn(300, 300), 'b': torch.arange(1000, dtype=torch.uint8)}, sys.argv[1], {'format': 'pt'})"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.safetensors").stat().st_size == size


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(tmp_path):
    from nf4lib.formats.safetensors import write_file

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".out.safetensors.nf4lib-{child.pid}-x.tmp"
        alive.write_bytes(b"in progress")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
        stale = tmp_path / f".out.safetensors.nf4lib-{dead}-y.tmp"
        stale.write_bytes(b"left by kill -9")
        write_file({"a": torch.zeros(2)}, tmp_path / "out.safetensors", {"format": "pt"})
        assert sorted(os.listdir(tmp_path)) == [alive.name, "out.safetensors"]  # a live writer's file is left alone
    finally:
        child.kill()
        child.wait()


def test_the_official_reader_reads_what_nf4lib_writes(tmp_path):
    from safetensors.torch import load_file

    _, q, path = _saved_model(tmp_path, double_quant=True)
    back = load_file(str(path))
    sd = q.state_dict()
    assert all(torch.equal(back[k], v) for k, v in sd.items())


# ----------------------------------------------------------------------------- fuzzing


def _mutations(blob: bytes, header_len: int, rng: random.Random):
    """Damaged copies of a checkpoint: bytes flipped in the header or data, truncations,
    and JSON values of the header or of a quant state replaced with hostile ones."""
    kind = rng.randrange(5)
    b = bytearray(blob)
    if kind == 0:  # flip bits anywhere in the header
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(8, 8 + header_len)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # damage the data section
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(8 + header_len, len(b))
            b[i] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # truncate or extend
        return bytes(b[: rng.randrange(len(b))]) if rng.random() < 0.7 else bytes(b) + b"\0" * rng.randint(1, 64)
    hostile = [0, -1, 1, 2, 3, 7, 8, 15, 16, 17, 48, 1 << 31, 1 << 62, 1 << 64, 1e999, -1e999, 0.5, "64", None, [], {}, True]
    header = json.loads(b[8 : 8 + header_len])
    if kind == 3:  # a header value replaced
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry = dict(header[name])
        if field == "dtype":
            entry["dtype"] = rng.choice(["U8", "F32", "F16", "I64", "BF16", "BOOL", "XX"])
        elif field == "shape":
            entry["shape"] = [rng.choice(hostile) if rng.random() < 0.5 else s for s in entry["shape"]] or [rng.choice(hostile)]
        else:
            entry["data_offsets"] = [rng.choice(hostile) if rng.random() < 0.5 else o for o in entry["data_offsets"]]
        header[name] = entry
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + bytes(b[8 + header_len :])
    return None  # kind 4: a quant state rewritten (done by the caller, on tensors)


def _quant_state_mutation(tensors: dict, rng: random.Random) -> dict:
    out = dict(tensors)
    key = rng.choice([k for k in tensors if ".quant_state." in k])
    meta = json.loads(bytes(tensors[key].tolist()))
    hostile = [0, -1, 1, 2, 8, 16, 48, 64, 128, 1 << 31, 1 << 64, 1e999, 0.5, "64", None, [], [64], [64, 64, 1], True,
               float("nan"), 2.0 ** 70]
    field = rng.choice(["blocksize", "shape", "dtype", "nested_blocksize", "nested_offset", "quant_type"])
    if field == "shape":
        meta["shape"] = rng.choice([[rng.choice(hostile), 64], [64, rng.choice(hostile)], rng.choice(hostile)])
    elif field == "dtype":
        meta["dtype"] = rng.choice(["float32", "bfloat16", "int8", "float64", 3, None])
    else:
        meta[field] = rng.choice(hostile)
    try:
        text = json.dumps(meta).encode()
    except ValueError:
        text = b"{"
    out[key] = torch.tensor(list(text), dtype=torch.uint8)
    return out


def test_mutation_fuzzer_over_valid_checkpoints(tmp_path):
    """3,000 damaged checkpoints (fixed seeds): each loads to a model that computes, or
    raises one clear error (ValueError, TypeError, or load_state_dict's RuntimeError)."""
    from safetensors import safe_open

    x = torch.randn(2, 64)
    outcomes = {"error": 0, "loaded": 0}
    for dq in (False, True):
        _, q, path = _saved_model(tmp_path, double_quant=dq)
        blob = path.read_bytes()
        header_len = struct.unpack("<Q", blob[:8])[0]
        with safe_open(str(path), "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        rng = random.Random(1234 + dq)
        target = tmp_path / "fuzz.safetensors"
        for _ in range(1500):
            mutated = _mutations(blob, header_len, rng)
            if mutated is None:
                _rewrite(target, _quant_state_mutation(tensors, rng), meta)
            else:
                target.write_bytes(mutated)
            skeleton = _skeleton(double_quant=dq)
            try:
                nf4lib.load_quantized(skeleton, target, strict=True)
            except (ValueError, TypeError, RuntimeError) as e:
                assert str(e), "an error must say what is wrong"
                outcomes["error"] += 1
                continue
            with torch.no_grad():
                y = skeleton(x)  # a loaded model computes (values may differ: the data was changed)
            assert y.shape == (2, 32)
            outcomes["loaded"] += 1
    assert outcomes["error"] > 1000 and outcomes["loaded"] > 100, outcomes


def test_field_fuzzer_over_nf4_pickles():
    """Random fields handed to the pickle's rebuild function: a valid weight or UnpicklingError."""
    rng = random.Random(7)
    inner, lay, shape = _good_fields()
    x = torch.randn(1, 64)
    sizes = [0, 1, 2, 3, 16, 63, 64, 65, 2048, 2049, 4096]
    for _ in range(1000):
        parts = dict(inner)
        layout = list(lay)
        shp = list(shape)
        what = rng.randrange(4)
        if what == 0:
            k = rng.choice(list(parts))
            parts[k] = torch.zeros(rng.choice(sizes), dtype=rng.choice([torch.uint8, torch.float32, torch.float16, torch.int64]))
        elif what == 1:
            layout[0] = rng.choice([0, 1, 8, 15, 16, 32, 48, 64, 128, 1 << 20, -64, 64.0, "64"])
        elif what == 2:
            shp[rng.randrange(2)] = rng.choice([0, 1, 32, 63, 64, 65, 128, 1 << 40, -64])
        else:
            layout[1] = rng.choice([None, 0, 2, 256, 1 << 64])
            if layout[1] is not None:
                parts.update(nested_absmax=torch.ones(rng.choice([1, 2])), nested_quant_map=torch.linspace(-1, 1, 256),
                             nested_offset=torch.tensor(0.0), absmax=torch.zeros(rng.choice([64, 65]), dtype=torch.uint8))
        try:
            w = _rebuild_nf4(parts, tuple(layout), tuple(shp), torch.float32, False)
        except pickle.UnpicklingError as e:
            assert "not a valid NF4 weight" in str(e)
            continue
        y = F.linear(torch.randn(1, w.shape[1]), w) if w.shape[1] else None
        assert y is None or y.shape == (1, w.shape[0])
