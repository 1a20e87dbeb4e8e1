"""Layers 3-4: the nf4lib::quantized_linear op, its kernels, autograd, vmap and compile."""

import sys

import pytest
import torch
import torch.nn.functional as F

import nf4lib
from nf4lib.ops.library import dequantize_args, op_args
from nf4lib.backends.cpu import kernels as cpu_kernel
from nf4lib.backends import default
from nf4lib.backends.triton import kernels as triton_kernels

OP = torch.ops.nf4lib.quantized_linear.default
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def expected(x, q, bias):
    return F.linear(x, nf4lib.dequantize(q).to(x.dtype), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_dense_linear(dtype, lead, double_quant):
    q = nf4lib.quantize(torch.randn(96, 128), double_quant=double_quant)
    x = torch.randn(*lead, 128).to(dtype)
    bias = torch.randn(96).to(dtype)
    y = nf4lib.quantized_linear(x, q, bias)
    assert y.shape == (*lead, 96) and y.dtype == dtype
    assert rel_err(y, expected(x, q, bias)) <= TOL[dtype]


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("code", ["nf4", "fp4", "int4", "user"])
def test_any_blocksize_and_codebook(blocksize, code):
    c = torch.tensor([-1.0, -0.3, 0.0, 0.2, 1.0]) if code == "user" else code
    q = nf4lib.quantize(torch.randn(64, 192), blocksize=blocksize, code=c)
    x = torch.randn(7, 192)
    assert rel_err(nf4lib.quantized_linear(x, q), expected(x, q, None)) <= 1e-5


def test_partial_blocks_straddling_rows():
    q = nf4lib.quantize(torch.randn(9, 50), blocksize=32)  # 450 elements: rows cut blocks
    x = torch.randn(3, 50)
    assert rel_err(nf4lib.quantized_linear(x, q), expected(x, q, None)) <= 1e-5


@pytest.mark.parametrize("m", [1, 8, 64])
def test_cpu_kernel_against_default_kernel(m, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_TILE_ELEMS", 4096)  # force several tiles
    q = nf4lib.quantize(torch.randn(300, 256), double_quant=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, 256).to(dtype)
        b = torch.randn(300).to(dtype)
        y = cpu_kernel.linear(x, q, b)
        r = default.linear(x, q, b)
        assert rel_err(y, r) <= TOL[dtype]


OPCHECK_CASES = [
    ((4, 128), (64, 128), False, True, torch.float32),
    ((2, 3, 128), (32, 128), True, False, torch.float32),
    ((1, 64), (16, 64), False, False, torch.bfloat16),
]


@pytest.mark.parametrize("x_shape, w_shape, dq, with_bias, dtype", OPCHECK_CASES)
def test_opcheck(x_shape, w_shape, dq, with_bias, dtype):
    q = nf4lib.quantize(torch.randn(w_shape), double_quant=dq)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    bias = torch.randn(w_shape[0], dtype=dtype, requires_grad=True) if with_bias else None
    torch.library.opcheck(OP, (x,), dict(op_args(q), bias=bias))


QUANTIZE_CASES = [  # (numel, blocksize, code, scale, weights)
    (64 * 9, 64, "nf4", "absmax", False),
    (1000, 128, "fp4", "absmax", False),  # a partial last block; FP4's storage order
    (64 * 5 + 7, 64, "nf4", "mse", True),
]


@pytest.mark.parametrize("n, bs, code, scale, weighted", QUANTIZE_CASES)
def test_opcheck_quantize(n, bs, code, scale, weighted):
    from nf4lib.core.codebooks import code_tables

    levels, thresholds, to_storage, identity = code_tables(code)
    weights = torch.rand(n) if weighted else None
    args = (torch.randn(n), bs, levels, thresholds, None if identity else to_storage, scale, weights)
    torch.library.opcheck(torch.ops.nf4lib.quantize.default, args)
    packed, absmax = torch.ops.nf4lib.quantize.default(*args)
    q = nf4lib.quantize(args[0], blocksize=bs, code=code, scale=scale, importance=weights)
    assert torch.equal(packed, q.packed) and torch.equal(absmax, q.absmax)


@pytest.mark.parametrize("shape, dq, dtype", [((64, 32), False, torch.float32), ((7, 45), True, torch.bfloat16),
                                              ((3, 2, 64), False, torch.float64)])
def test_opcheck_dequantize(shape, dq, dtype):
    q = nf4lib.quantize(torch.randn(shape), double_quant=dq)
    torch.library.opcheck(torch.ops.nf4lib.dequantize.default, (), dict(dequantize_args(q), dtype=dtype))
    assert torch.equal(torch.ops.nf4lib.dequantize.default(dtype=dtype, **dequantize_args(q)), nf4lib.dequantize(q, dtype))


@pytest.mark.parametrize("g_shape, w_shape, dq, dtype", [((4, 64), (64, 128), False, torch.float32),
                                                      ((2, 3, 32), (32, 128), True, torch.float32),
                                                      ((1, 16), (16, 64), False, torch.bfloat16)])
def test_opcheck_linear_grad(g_shape, w_shape, dq, dtype):
    q = nf4lib.quantize(torch.randn(w_shape), double_quant=dq)
    grad = torch.randn(g_shape, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.nf4lib.quantized_linear_grad.default, (grad,), op_args(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_cpu_backward_kernel_matches_the_default(monkeypatch, dtype, m):
    # tiles of whole rows, summed in float32: the default's grad @ W up to summation order
    monkeypatch.setattr(cpu_kernel, "_TILE_ELEMS", 4096)  # several tiles
    monkeypatch.setattr(cpu_kernel, "_TILE_ELEMS_HALF", 4096)
    q = nf4lib.quantize(torch.randn(300, 192), double_quant=True)
    g = torch.randn(m, 300).to(dtype)
    got, want = cpu_kernel.linear_grad(g, q), (g.double() @ nf4lib.dequantize(q, torch.float64).to(dtype).double())
    assert got.dtype == dtype and got.shape == (m, 192)
    assert rel_err(got, want) <= TOL[dtype]


def test_every_op_has_a_default_and_a_cpu_kernel_that_agree():
    # the CPU kernels (native or eager) give the default kernel's bytes and values
    from nf4lib.core.codebooks import code_tables

    x = torch.randn(77, 64 * 3 + 5)
    levels, thresholds, _, _ = code_tables("nf4")
    for scale in ("absmax", "mse"):
        got = cpu_kernel.quantize(x.reshape(-1), 64, levels, thresholds, None, scale, None)
        want = default.quantize(x.reshape(-1), 64, levels, thresholds, None, scale, None)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), scale
    q = nf4lib.quantize(x, double_quant=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(cpu_kernel.dequantize(q, dtype), default.dequantize(q, dtype)), dtype


def test_an_op_called_directly_checks_its_arguments():
    # the kernels' door: a malformed call through torch.ops is refused before any kernel reads
    from nf4lib.core.codebooks import code_tables

    levels, thresholds, _, _ = code_tables("nf4")
    with pytest.raises(ValueError, match="blocksize must be an int power of two"):
        torch.ops.nf4lib.quantize.default(torch.randn(64), 24, levels, thresholds)
    with pytest.raises(ValueError, match="thresholds must be 1-D of shape"):
        torch.ops.nf4lib.quantize.default(torch.randn(64), 64, levels, thresholds[:3])
    q = nf4lib.quantize(torch.randn(64, 64))
    args = dequantize_args(q)
    args["absmax"] = args["absmax"][:10]
    with pytest.raises(ValueError, match="absmax must be float32 of shape"):
        torch.ops.nf4lib.dequantize.default(dtype=torch.float32, **args)


def test_fake_kernel_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = nf4lib.quantize(torch.randn(48, 64))
    mode = FakeTensorMode()
    fake_q = torch.utils._pytree.tree_map(mode.from_tensor, q)
    fake_x = mode.from_tensor(torch.empty(5, 7, 64))
    with mode:
        y = nf4lib.quantized_linear(fake_x, fake_q)
    assert y.shape == (5, 7, 48)
    y_meta = nf4lib.quantized_linear(torch.empty(3, 64, device="meta"), q.to("meta"))
    assert y_meta.shape == (3, 48) and y_meta.device.type == "meta"


def test_compile_fullgraph_no_graph_break():
    q = nf4lib.quantize(torch.randn(64, 96), double_quant=True)
    bias = torch.randn(64)

    def f(x):
        return torch.relu(nf4lib.quantized_linear(x, q, bias)) * 2

    x = torch.randn(4, 96)
    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True)
    assert rel_err(compiled(x), f(x)) <= 1e-6


def test_autograd_matches_dense_and_weight_is_frozen():
    w = torch.randn(40, 64)
    q = nf4lib.quantize(w)
    x = torch.randn(3, 5, 64, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4lib.quantized_linear(x, q, bias)
    upstream = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), upstream)
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    gx2, gb2 = torch.autograd.grad(F.linear(x2, nf4lib.dequantize(q), b2), (x2, b2), upstream)
    assert rel_err(gx, gx2) <= 1e-5 and rel_err(gb, gb2) <= 1e-5
    # nothing of the weight's full size (40*64) is kept for backward
    assert saved and max(saved) < 40 * 64
    assert not q.packed.requires_grad


def test_gradcheck_float64_input():
    q = nf4lib.quantize(torch.randn(6, 32), blocksize=32)
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: nf4lib.quantized_linear(x, q, b), (x, b))


def test_vmap_over_inputs_and_over_weights():
    q = nf4lib.quantize(torch.randn(32, 64))
    xs = torch.randn(4, 3, 64)
    ys = torch.func.vmap(lambda x: nf4lib.quantized_linear(x, q))(xs)
    assert rel_err(ys, expected(xs, q, None)) <= 1e-5
    ys1 = torch.func.vmap(lambda x: nf4lib.quantized_linear(x, q), in_dims=1)(xs)
    assert rel_err(ys1, expected(xs.transpose(0, 1), q, None)) <= 1e-5
    qs = torch.func.vmap(nf4lib.quantize)(torch.randn(3, 32, 64))
    x = torch.randn(2, 64)
    yw = torch.func.vmap(lambda qq: nf4lib.quantized_linear(x, qq))(qs)
    for i in range(3):
        qi = nf4lib.QuantizedTensor(qs.packed[i], qs.absmax[i], qs.code[i], (32, 64), torch.float32, 64)
        assert rel_err(yw[i], expected(x, qi, None)) <= 1e-5


# ---- bad input ---------------------------------------------------------------


def test_bad_inputs():
    q = nf4lib.quantize(torch.randn(16, 32))
    with pytest.raises(ValueError, match=r"33.*in_features 32"):
        nf4lib.quantized_linear(torch.randn(2, 33), q)
    with pytest.raises(TypeError, match="int64"):
        nf4lib.quantized_linear(torch.ones(2, 32, dtype=torch.long), q)
    with pytest.raises(ValueError, match=r"bias.*\(15,\).*16"):
        nf4lib.quantized_linear(torch.randn(2, 32), q, torch.randn(15))
    with pytest.raises(ValueError, match="meta.*cpu"):
        nf4lib.quantized_linear(torch.randn(2, 32, device="meta"), q)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        nf4lib.quantized_linear(torch.randn(2, 32), torch.randn(16, 32))
    with pytest.raises(ValueError, match="2-D"):
        nf4lib.quantized_linear(torch.randn(2, 32), nf4lib.quantize(torch.randn(32)))


# ---- device registrations and the Triton kernels -----------------------------


def test_cuda_and_xpu_kernels_are_registered():
    for key in ("CPU", "CUDA", "XPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("nf4lib::quantized_linear", key), key
    from nf4lib.backends.triton import cuda, xpu  # noqa: F401

    assert "intel_extension_for_pytorch" not in sys.modules


def test_xpu_and_cuda_fallback_without_triton(monkeypatch):
    """Where Triton is missing the GPU kernels fall back to dequantize + matmul."""
    monkeypatch.setattr(triton_kernels, "HAVE_TRITON", False)
    q = nf4lib.quantize(torch.randn(24, 64), double_quant=True)
    x = torch.randn(3, 64)
    y = triton_kernels.linear(x, q, None)
    assert rel_err(y, expected(x, q, None)) <= 1e-6




def test_the_backward_op_maps_over_batched_weights():
    # vmap over stacked weights: one call per weight, as for the forward op
    qs = [nf4lib.quantize(torch.randn(16, 64)) for _ in range(3)]
    packed = torch.stack([q.packed for q in qs])
    absmax = torch.stack([q.absmax for q in qs])
    g = torch.randn(3, 2, 16)
    got = torch.func.vmap(lambda g, p, a: torch.ops.nf4lib.quantized_linear_grad.default(g, p, a, qs[0].code, 16, 64, 64))(g, packed, absmax)
    want = torch.stack([g[i] @ nf4lib.dequantize(qs[i]) for i in range(3)])
    assert rel_err(got, want) <= 1e-6
