"""NF4Linear, bitsandbytes interop (from_bnb / to_bnb, Linear4bit) and safetensors checkpoints."""

import json
import os

import pytest
import torch
from torch import nn

import nf4lib



def _linear(out_f=64, in_f=128, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _bnb_linear(weight, bias, quant_type, double_quant, blocksize=64):
    """A bitsandbytes Linear4bit on CPU holding ``weight`` (quantized by bitsandbytes)."""
    import bitsandbytes as bnb

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias is not None, compute_dtype=torch.float32,
        compress_statistics=double_quant, quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=double_quant,
        quant_type=quant_type, blocksize=blocksize,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone())
    return layer.to("cpu")  # Params4bit quantizes on .to(device)


# ----------------------------------------------------------------------------- NF4Linear


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_layer_with_dequantized_weight(double_quant, bias):
    lin = _linear(bias=bias)
    layer = nf4lib.NF4Linear.from_linear(lin, double_quant=double_quant)
    x = torch.randn(3, 5, 128)
    want = nn.functional.linear(x, nf4lib.dequantize(layer.quantized), lin.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.dequantize(), nf4lib.dequantize(nf4lib.quantize(lin.weight, double_quant=double_quant)))


def test_from_linear_leaves_the_input_alone_and_copies_the_bias():
    lin = _linear()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = nf4lib.NF4Linear.from_linear(lin)
    assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b)
    assert layer.bias.data_ptr() != lin.bias.data_ptr()
    assert isinstance(layer, nn.Linear)  # PEFT and layer scans treat it as a linear layer
    # the 4-bit weight is a frozen Parameter (an NF4Tensor), so parameter scans see it
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.weight, nf4lib.NF4Tensor)
    assert not layer.weight.requires_grad and layer.weight.shape == (64, 128)


def test_no_full_precision_weight_is_held():
    layer = nf4lib.NF4Linear.from_linear(_linear(256, 512))
    w = layer.weight
    held = sum(t.numel() * t.element_size() for t in w._inner().values()) + layer.bias.numel() * 4
    assert held < 256 * 512 * 4 / 6  # fp32 weight would be 512 KiB; 4-bit + absmax is ~74 KiB


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype_and_to_dtype_leave_the_4bit_data_alone(compute_dtype):
    layer = nf4lib.NF4Linear.from_linear(_linear(), double_quant=True)
    parts = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    moved = layer.to(compute_dtype)
    assert moved is layer and layer.compute_dtype == compute_dtype
    assert layer.bias.dtype == compute_dtype
    after = layer.state_dict()
    for k, v in parts.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.float32  # output in the input's dtype, computed in compute_dtype
    want = nn.functional.linear(x.to(compute_dtype), layer.dequantize(compute_dtype), layer.bias).float()
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
    layer.float()
    assert layer.compute_dtype == torch.float32


def test_to_device_moves_the_4bit_data_and_keeps_dtypes():
    layer = nf4lib.NF4Linear.from_linear(_linear(), double_quant=True)
    dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
    moved = layer.to("meta")  # the only other device CI has; CUDA/XPU take the same path
    w = moved.weight
    assert isinstance(w, nf4lib.NF4Tensor) and w.is_meta and moved.bias.is_meta
    assert all(t.is_meta for t in w._inner().values())
    assert moved.compute_dtype == torch.float32
    assert {k: t.dtype for k, t in w._inner().items()} == {
        "packed": torch.uint8, "absmax": torch.uint8, "quant_map": torch.float32,
        "nested_absmax": torch.float32, "nested_quant_map": torch.float32, "nested_offset": torch.float32,
    }
    assert dtypes["weight.absmax"] == torch.uint8


def test_compute_dtype_from_constructor():
    layer = nf4lib.NF4Linear.from_linear(_linear(dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16
    layer16 = nf4lib.NF4Linear.from_linear(_linear(), compute_dtype=torch.float16)
    assert layer16.compute_dtype == torch.float16
    with pytest.raises(ValueError, match="torch.int8"):
        nf4lib.NF4Linear.from_linear(_linear(), compute_dtype=torch.int8)


def test_extra_repr_is_readable():
    r = repr(nf4lib.NF4Linear.from_linear(_linear(), double_quant=True))
    for piece in ("in_features=128", "out_features=64", "code=nf4", "blocksize=64", "double_quant=True", "bits_per_weight=4.133"):
        assert piece in r, (piece, r)
    assert "code=int4" in repr(nf4lib.NF4Linear.from_linear(_linear(), code="int4"))


def test_bad_arguments():
    with pytest.raises(TypeError, match="Conv1d"):
        nf4lib.NF4Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="in_features"):
        nf4lib.NF4Linear(0, 4)
    with pytest.raises(ValueError, match="blocksize"):
        nf4lib.NF4Linear(8, 4, blocksize=60)


def test_gradients_reach_input_and_bias_only():
    layer = nf4lib.NF4Linear.from_linear(_linear())
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert all(not b.requires_grad for b in layer.buffers())


# ----------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("kw", [{}, {"double_quant": True}, {"code": "fp4"}, {"code": "int4"}, {"blocksize": 128}])
def test_state_dict_round_trips_bit_for_bit_into_a_fresh_layer(kw):
    layer = nf4lib.NF4Linear.from_linear(_linear(), **kw)
    sd = layer.state_dict()
    fresh = nf4lib.NF4Linear(128, 64)  # default layout: loading adopts the checkpoint's
    fresh.load_state_dict(sd)
    back = fresh.state_dict()
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
        assert back[k].data_ptr() != sd[k].data_ptr() or sd[k].numel() == 0, f"{k} aliases the source"
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_keys_are_documented_bitsandbytes_keys():
    sd = nf4lib.NF4Linear.from_linear(_linear(), double_quant=True).state_dict()
    assert list(sd) == [
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    ]
    assert sd["weight"].shape == (64 * 128 // 2, 1) and sd["weight"].dtype == torch.uint8


def test_mismatched_state_dict_names_the_key():
    sd = nf4lib.NF4Linear.from_linear(_linear(64, 128)).state_dict()
    other = nf4lib.NF4Linear(256, 64)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(64, 128\).*\(64, 256\)"):
        other.load_state_dict(sd)
    broken = dict(sd)
    broken["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="weight.absmax"):
        nf4lib.NF4Linear(128, 64).load_state_dict(broken)
    no_state = {k: v for k, v in sd.items() if "quant_state" not in k}
    with pytest.raises(RuntimeError, match="quant_state"):
        nf4lib.NF4Linear(128, 64).load_state_dict(no_state)
    bad_bias = dict(sd, bias=torch.zeros(3))
    with pytest.raises(RuntimeError, match="size mismatch for bias"):
        nf4lib.NF4Linear(128, 64).load_state_dict(bad_bias)


def test_failed_load_leaves_the_layer_unchanged():
    layer = nf4lib.NF4Linear.from_linear(_linear(64, 128))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = nf4lib.NF4Linear.from_linear(_linear(64, 256)).state_dict()
    with pytest.raises(RuntimeError):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_linear4bit_both_ways(bnb, quant_type, double_quant, dtype):
    torch.manual_seed(1)
    w, b = torch.randn(64, 128).to(dtype), torch.randn(64).to(dtype)
    ref = _bnb_linear(w, b, quant_type, double_quant)
    sd = ref.state_dict()

    # Into nf4lib: same dequantized weight, same outputs.
    q = nf4lib.from_bnb(sd)
    deq_bnb = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(nf4lib.dequantize(q), deq_bnb)
    layer = nf4lib.NF4Linear(128, 64, dtype=dtype)
    layer.load_state_dict(sd)
    x = torch.randn(5, 128).to(dtype)
    ref.compute_dtype = dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x), ref(x), rtol=tol, atol=tol)

    # Back out: the same keys and identical bytes.
    out = layer.state_dict()
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k

    # nf4lib's own quantization writes bitsandbytes' bytes (double-quant codes: see docs/limits.md).
    ours = nf4lib.to_bnb(nf4lib.quantize(w, code=quant_type, double_quant=double_quant))
    for k, v in ours.items():
        if not (double_quant and k == "weight.absmax"):
            assert torch.equal(v, sd[k]), k


def test_bitsandbytes_reads_what_nf4lib_writes(bnb):
    w = torch.randn(64, 128)
    q = nf4lib.quantize(w, double_quant=True)
    qs = bnb.functional.QuantState.from_dict(
        {k[len("weight."):]: v for k, v in nf4lib.to_bnb(q).items() if k != "weight"}, device=torch.device("cpu")
    )
    deq = bnb.functional.dequantize_4bit(nf4lib.to_bnb(q)["weight"], qs)
    assert torch.equal(deq, nf4lib.dequantize(q))


def test_to_bnb_names_codebooks_bitsandbytes_lacks():
    sd = nf4lib.to_bnb(nf4lib.quantize(torch.randn(8, 64), code="int4"), prefix="lin.weight")
    (key,) = [k for k in sd if ".quant_state." in k]
    assert key == "lin.weight.quant_state.nf4lib__int4"
    assert json.loads(bytes(sd[key].tolist()))["quant_type"] == "int4"
    custom = nf4lib.to_bnb(nf4lib.quantize(torch.randn(8, 64), code=torch.tensor([-1.0, 0.0, 0.5, 1.0])))
    assert "weight.quant_state.nf4lib__custom" in custom
    q = nf4lib.from_bnb(custom)
    assert torch.equal(q.code, torch.tensor([-1.0, 0.0, 0.5, 1.0]))


def test_from_bnb_errors_name_the_key():
    sd = nf4lib.to_bnb(nf4lib.quantize(torch.randn(8, 64)))
    with pytest.raises(ValueError, match="quant_state"):
        nf4lib.from_bnb({k: v for k, v in sd.items() if "quant_state" not in k})
    with pytest.raises(ValueError, match="'weight.absmax'"):
        nf4lib.from_bnb(dict(sd, **{"weight.absmax": sd["weight.absmax"][:1]}))
    with pytest.raises(ValueError, match="missing key 'weight.quant_map'"):
        nf4lib.from_bnb({k: v for k, v in sd.items() if k != "weight.quant_map"})
    junk = {k: v for k, v in sd.items()}
    junk["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a readable"):
        nf4lib.from_bnb(junk)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        nf4lib.to_bnb(torch.zeros(3))


# ----------------------------------------------------------------------------- safetensors


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64))
    m.register_buffer("table", torch.arange(4.0), persistent=False)
    return m


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_and_load_into_a_meta_skeleton(tmp_path, double_quant):
    qm = nf4lib.convert(_mlp(), double_quant=double_quant)
    path = tmp_path / "m.safetensors"
    nf4lib.save_quantized(qm, path)
    with torch.device("meta"):
        skeleton = nf4lib.convert(_mlp(), double_quant=double_quant)
    assert all(t.is_meta for k, t in skeleton.state_dict().items() if "quant_state" not in k)  # nothing materialised
    result = nf4lib.load_quantized(skeleton, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = skeleton  # loaded in place, as load_state_dict does
    want = qm.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(loaded.table, torch.arange(4.0))  # non-persistent buffers come back too
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), qm(x))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "m.safetensors"]  # no temporary file left


def test_tied_weights_survive_save_and_load(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.body = nn.Linear(16, 16)
            self.lm_head = nn.Linear(16, 32, bias=False)
            self.lm_head.weight = self.embed.weight

    torch.manual_seed(0)
    qm = nf4lib.convert(Tied())
    path = tmp_path / "t.safetensors"
    nf4lib.save_quantized(qm, path)
    with torch.device("meta"):
        skeleton = nf4lib.convert(Tied())
    nf4lib.load_quantized(skeleton, path)
    loaded = skeleton
    assert loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(loaded.embed.weight, qm.embed.weight)


def test_load_errors(tmp_path):
    model = nf4lib.convert(_mlp())
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        nf4lib.load_quantized(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        nf4lib.load_quantized(model, bad)
    other = tmp_path / "other.safetensors"
    nf4lib.save_quantized(nf4lib.convert(nn.Sequential(nn.Linear(64, 32))), other)
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        nf4lib.load_quantized(model, other)


def test_load_non_strict_returns_missing_and_unexpected_keys(tmp_path):
    qm = nf4lib.convert(_mlp())
    path = tmp_path / "m.safetensors"
    nf4lib.save_quantized(qm, path)

    class Other(nn.Module):  # the MLP's first layer and norm, plus a layer the file lacks
        def __init__(self):
            super().__init__()
            self.add_module("0", nn.Linear(64, 128))
            self.add_module("3", nn.LayerNorm(64))
            self.extra = nn.Linear(4, 4)

    with torch.device("meta"):
        skeleton = nf4lib.convert(Other())
    with pytest.raises(RuntimeError, match="Missing key"):
        nf4lib.load_quantized(skeleton, path)
    with torch.device("meta"):
        skeleton = nf4lib.convert(Other())
    result = nf4lib.load_quantized(skeleton, path, strict=False)
    assert set(result.missing_keys) == {"extra.weight", "extra.bias"}
    assert "2.weight" in result.unexpected_keys and "table" in result.unexpected_keys
    assert torch.equal(getattr(skeleton, "0").weight.packed, qm[0].weight.packed)
    assert skeleton.extra.weight.is_meta  # what the file lacks stays as it was


def test_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    from nf4lib.formats import safetensors as _safetensors

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(_safetensors.StreamingWriter, "commit", boom)
    with pytest.raises(KeyboardInterrupt):
        nf4lib.save_quantized(nf4lib.convert(_mlp()), path)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_integer_and_bool_inputs_are_type_errors():
    layer = nf4lib.NF4Linear.from_linear(_linear())
    for dtype in (torch.int64, torch.int32, torch.bool, torch.uint8):
        with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
            layer(torch.ones(2, 128, dtype=dtype))
    with pytest.raises(ValueError, match="int8"):
        nf4lib.dequantize(layer.quantized, dtype=torch.int8)


@pytest.mark.parametrize("blocksize, family", [(16, "nf4lib"), (32, "bitsandbytes"), (4096, "bitsandbytes"), (8192, "nf4lib")])
def test_to_bnb_labels_blocksizes_bitsandbytes_cannot_read(blocksize, family):
    q = nf4lib.quantize(torch.randn(64, 256), blocksize=blocksize)
    sd = nf4lib.to_bnb(q)
    assert [k for k in sd if ".quant_state." in k] == [f"weight.quant_state.{family}__nf4"]
    back = nf4lib.from_bnb(sd)
    assert back.blocksize == blocksize and torch.equal(nf4lib.dequantize(back), nf4lib.dequantize(q))


def test_state_dict_keys_resolve_by_attribute():
    layer = nf4lib.NF4Linear.from_linear(_linear(), double_quant=True)
    sd = layer.state_dict()
    for key, value in sd.items():
        obj = layer
        for part in key.split("."):
            obj = getattr(obj, part)
        assert torch.equal(obj if key != "weight" else obj.packed.reshape(-1, 1), value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_small_calls_through_the_prepared_weight_equal_the_op(dtype, rows):
    # no-grad and grad calls of up to 16 rows skip the op (its checks are cached on the
    # frozen weight): the same bits as the op, and the same gradients
    layer = nf4lib.NF4Linear.from_linear(nn.Linear(192, 80), double_quant=True, compute_dtype=dtype)
    x = torch.randn(rows, 192).to(dtype)
    op = torch.ops.nf4lib.quantized_linear.default
    want = op(x, bias=layer.bias.to(dtype), **nf4lib.ops.library.op_args(layer.quantized))
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    assert torch.equal(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(xg.grad.float(), (g.float() @ layer.dequantize(torch.float32)).to(dtype).float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(layer.bias.grad.float(), g.float().sum(0), rtol=1e-2, atol=1e-2)


def test_the_prepared_weight_follows_loads_copies_and_switches():
    import copy
    import pickle

    from nf4lib.backends.cpu import native

    a, b = nf4lib.NF4Linear.from_linear(nn.Linear(64, 32)), nf4lib.NF4Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64)
    with torch.no_grad():
        ya = a(x)
        a.load_state_dict(b.state_dict())  # in place: the cached plan must not serve the old bytes
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), ya)
        twin = copy.deepcopy(a)
        assert torch.equal(twin(x), a(x))
        assert torch.equal(pickle.loads(pickle.dumps(a))(x), a(x))
        with native.disabled():  # the switch reaches the fast path too
            assert torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-6)
