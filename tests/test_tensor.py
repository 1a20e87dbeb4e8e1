"""Layer 5: NF4Tensor, the 4-bit weight as a tensor subclass (core tier)."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nf4lib
from nf4lib import NF4Tensor


def _w(shape=(48, 96), double_quant=False, code="nf4", dtype=torch.float32, blocksize=64):
    dense = torch.randn(shape, dtype=dtype)
    return dense, NF4Tensor.from_quantized(nf4lib.quantize(dense, double_quant=double_quant, code=code, blocksize=blocksize))


def _same_inner(a, b):
    return a._inner().keys() == b._inner().keys() and all(torch.equal(t, getattr(b, k)) for k, t in a._inner().items())


@pytest.mark.parametrize("double_quant", [False, True])
def test_is_a_weight_of_the_outer_shape_and_dtype(double_quant):
    dense, w = _w(double_quant=double_quant)
    assert isinstance(w, torch.Tensor) and w.shape == (48, 96) and w.dtype == torch.float32
    assert w.numel() == 48 * 96 and w.dim() == 2 and w.device.type == "cpu"
    assert torch.equal(w.dequantize(), nf4lib.dequantize(nf4lib.quantize(dense, double_quant=double_quant)))
    q = w.quantized
    assert q.shape == (48, 96) and q.packed is w.packed and q.double_quant == double_quant
    assert "NF4Tensor(shape=(48, 96)" in repr(w)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_and_matmul_run_the_op_without_dequantizing(double_quant, monkeypatch):
    dense, w = _w(double_quant=double_quant)
    ref = w.dequantize()
    x, b = torch.randn(5, 96), torch.randn(48)
    want = F.linear(x, ref, b)
    from nf4lib.weight import tensor as _tensor

    monkeypatch.setattr(_tensor, "_dense_fallback", lambda *a: pytest.fail(f"dequantized for {a[0]}"))
    for got in (F.linear(x, w, b), x @ w.T + b, torch.matmul(x, w.t()) + b, torch.mm(x, w.T) + b,
                torch.nn.functional.linear(x.view(5, 1, 96), w, b).view(5, 48)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_ops_read_the_dense_weight_and_return_plain_tensors():
    dense, w = _w()
    ref = w.dequantize()
    for got, want in ((w + 1, ref + 1), (w.sum(0), ref.sum(0)), (w[3], ref[3]), (w.float() * 2, ref * 2), (w.T @ torch.ones(48), ref.T @ torch.ones(48))):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want)
    g = torch.randn(2, 48)
    torch.testing.assert_close(g @ w, g @ ref)  # grad @ W, as backward computes it


def test_detach_clone_and_dtype_changes():
    _, w = _w(double_quant=True)
    d = w.detach()
    assert type(d) is NF4Tensor and d.packed.data_ptr() == w.packed.data_ptr()
    c = w.clone()
    assert type(c) is NF4Tensor and _same_inner(c, w) and c.packed.data_ptr() != w.packed.data_ptr()
    for dtype in (torch.bfloat16, torch.float16):
        h = w.to(dtype)
        assert type(h) is NF4Tensor and h.dtype == dtype and _same_inner(h, w)
        assert h.quantized.dtype == torch.float32  # the source dtype the checkpoint records
        assert {k: t.dtype for k, t in h._inner().items()} == {k: t.dtype for k, t in w._inner().items()}
    with pytest.raises(TypeError, match="int8"):
        w.to(torch.int8)


def test_device_moves_keep_4_bits():
    _, w = _w(double_quant=True)
    m = w.to("meta")
    assert type(m) is NF4Tensor and m.is_meta and all(t.is_meta for t in m._inner().values())
    assert m.packed.dtype == torch.uint8 and m.absmax.dtype == torch.uint8


def test_copy_between_nf4_tensors_and_from_dense():
    dense, w = _w()
    _, other = _w()
    target = other.clone()
    ptr = target.packed.data_ptr()
    target.copy_(w)
    assert _same_inner(target, w) and target.packed.data_ptr() == ptr  # in place
    new = torch.randn(48, 96)
    target.copy_(new)  # a dense source is quantized with the target's settings
    assert torch.equal(target.dequantize(), nf4lib.dequantize(nf4lib.quantize(new)))
    _, dq = _w(double_quant=True)
    with pytest.raises(ValueError, match="layout"):
        target.copy_(dq)
    with pytest.raises(RuntimeError, match="shape"):
        target.copy_(torch.randn(3, 3))


def test_in_place_ops_quantize_back_into_the_weight():
    _, w = _w()
    p = nn.Parameter(w, requires_grad=False)
    with torch.no_grad():
        nn.init.normal_(p, std=0.02)  # what a model's init_weights does
    assert type(p) is NF4Tensor and abs(p.dequantize().std().item() - 0.02) < 0.002
    with torch.no_grad():
        p.zero_()
    assert p.dequantize().abs().max() == 0


def test_empty_like_pickle_save_deepcopy():
    _, w = _w(double_quant=True)
    e = torch.empty_like(w)
    assert type(e) is NF4Tensor and e.shape == w.shape and e.packed.shape == w.packed.shape
    assert not w.is_pinned()
    for back in (pickle.loads(pickle.dumps(w)), copy.deepcopy(w)):
        assert type(back) is NF4Tensor and _same_inner(back, w) and back.packed.data_ptr() != w.packed.data_ptr()
    p = nn.Parameter(w, requires_grad=False)
    buf = io.BytesIO()
    torch.save({"w": p}, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True, the default
    assert type(loaded["w"]) is NF4Tensor and _same_inner(loaded["w"], w)
    c = copy.deepcopy(p)
    assert isinstance(c, nn.Parameter) and type(c) is NF4Tensor and not c.requires_grad


def test_parameter_and_module_conversions():
    _, w = _w()
    m = nn.Linear(96, 48)
    m.weight = nn.Parameter(w, requires_grad=False)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    m.to(torch.bfloat16)
    assert type(m.weight) is NF4Tensor and m.weight.dtype == torch.bfloat16 and isinstance(m.weight, nn.Parameter)
    y = m(torch.randn(2, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 48)


def test_bad_input():
    _, w = _w()
    with pytest.raises(TypeError, match="int64"):
        F.linear(torch.ones(2, 96, dtype=torch.long), w)
    with pytest.raises(TypeError, match="bool"):
        F.linear(torch.ones(2, 96, dtype=torch.bool), w)
    with pytest.raises(RuntimeError, match="bfloat16"):
        F.linear(torch.randn(2, 96, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="in_features 96"):
        F.linear(torch.randn(2, 95), w)
    with pytest.raises(ValueError, match="2-D"):
        NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(64)))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        NF4Tensor.from_quantized(torch.randn(4, 4))


def test_compile_fullgraph_forward_and_backward_trace_the_subclass():
    _, w = _w(double_quant=True)
    p = nn.Parameter(w, requires_grad=False)
    b = nn.Parameter(torch.randn(48))

    def f(x):
        return (F.gelu(F.linear(x, p, b)) + x.sum(-1, keepdim=True) @ torch.ones(1, 48)).sum()

    x = torch.randn(4, 96, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    got = torch.compile(f, fullgraph=True)(x)
    (gx,) = torch.autograd.grad(got, x)
    x2 = x.detach().clone().requires_grad_()
    want = f(x2)
    (gx2,) = torch.autograd.grad(want, x2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-5)


def test_flatten_unflatten_round_trip():
    _, w = _w(double_quant=True)
    names, ctx = w.__tensor_flatten__()
    assert set(names) == {"packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"}
    back = NF4Tensor.__tensor_unflatten__({k: getattr(w, k) for k in names}, ctx, w.shape, w.stride())
    assert type(back) is NF4Tensor and _same_inner(back, w) and back.dtype == w.dtype
    assert w._stable_hash_for_caching() == back._stable_hash_for_caching()


def test_torch_export_of_a_converted_model_calls_the_op():
    model = nf4lib.convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), double_quant=True).eval()
    x = torch.randn(2, 64)
    ep = torch.export.export(model, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.nf4lib.quantized_linear.default) == 2
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_setting_data_takes_the_new_contents(double_quant):
    # ``param.data = new`` (how PEFT writes merged weights) swaps the whole 4-bit weight;
    # before, the Python-held fields stayed and the assignment silently did nothing.
    lin = nf4lib.NF4Linear.from_linear(nn.Linear(96, 48), double_quant=double_quant)
    w0 = lin.weight.dequantize().clone()
    alias = lin.weight.data
    delta = 0.05 * torch.randn(48, 96)
    want = nf4lib.dequantize(nf4lib.quantize(w0 + delta, double_quant=double_quant))

    other = lin.weight.data.clone()
    other += delta  # in-place on an NF4Tensor: re-quantized
    lin.weight.data = other
    assert isinstance(lin.weight, nn.Parameter) and type(lin.weight) is NF4Tensor
    assert torch.equal(lin.weight.dequantize(), want)
    x = torch.randn(3, 96)
    torch.testing.assert_close(lin(x), x @ want.T + lin.bias, rtol=1e-5, atol=1e-5)

    lin.weight.data = w0 - delta  # dense values: quantized with the weight's settings
    assert torch.equal(lin.weight.dequantize(), nf4lib.dequantize(nf4lib.quantize(w0 - delta, double_quant=double_quant)))
    assert lin.double_quant == double_quant
    assert torch.equal(alias.dequantize(), w0)  # an earlier alias keeps its values

    with pytest.raises(TypeError, match="torch.uint8"):
        lin.weight.data = torch.zeros(48, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(48, 96\).*\(96, 48\)"):
        lin.weight.data = torch.zeros(96, 48)


def test_memory_freed_and_gathered_again_under_the_weight_is_read_afresh():
    # FSDP2 frees an unsharded weight's memory between forwards (storage().resize_(0)) and
    # gathers it again into new memory, writing through the storage: no version counter
    # moves. A small call's prepared native arguments must not keep pointing at the freed
    # memory; the new bytes must be what the next call reads.
    lin = nf4lib.NF4Linear.from_linear(nn.Linear(256, 64, bias=False))
    x = torch.randn(3, 256)
    with torch.no_grad():
        lin(x)  # prepares the weight's native arguments where the library is there
    new = nf4lib.quantize(torch.randn(64, 256))
    storage, keep = lin.weight.packed.untyped_storage(), []
    for _ in range(3):  # free, take the memory for something else, gather into new memory
        storage.resize_(0)
        keep.append(torch.full((storage.nbytes() + 4096,), 7, dtype=torch.uint8))
        storage.resize_(new.packed.numel())
        storage.copy_(new.packed.untyped_storage())
        lin.weight.absmax.untyped_storage().copy_(new.absmax.untyped_storage())
        with torch.no_grad():
            got = lin(x)
        torch.testing.assert_close(got, x @ nf4lib.dequantize(new).T, rtol=1e-5, atol=1e-5)


def test_compute_dtype_is_settable_over_the_same_bytes():
    lin = nf4lib.NF4Linear.from_linear(nn.Linear(96, 48))
    packed = lin.weight.packed.clone()
    lin.compute_dtype = torch.bfloat16
    assert lin.weight.dtype == torch.bfloat16 and torch.equal(lin.weight.packed, packed)
    x = torch.randn(2, 96)
    assert lin(x).dtype == torch.float32  # output in the input's dtype, as before
    with pytest.raises(ValueError, match="int8"):
        lin.compute_dtype = torch.int8


def test_kernels_are_registered_however_the_weight_is_reached():
    # `import nf4lib` before torch loads nothing; a weight reached through a private module
    # (as unpickling does) must still find its kernels.
    import subprocess
    import sys

    code = (
        "import nf4lib, torch\n"
        "from nf4lib.weight.linear import NF4Linear\n"
        "lin = NF4Linear.from_linear(torch.nn.Linear(64, 32))\n"
        "print(tuple(lin(torch.randn(2, 64)).shape))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(2, 32)" in r.stdout
