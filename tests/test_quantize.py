"""Layer 2: quantize / dequantize against the numpy reference and bitsandbytes."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nf4lib
from _oracles import bnb_dequantize_4bit
from nf4lib.backends import default
from reference import nf4 as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (64,), (65,), (33, 7), (3, 5, 129), (128, 96), (2, 4096 + 31)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
CODES = ["nf4", "fp4", "int4", torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0])]


def _reference(x, blocksize, code):
    levels = nf4lib.core.codebooks.resolve_code(code).numpy()
    return ref.quantize(x.float().numpy(), blocksize, levels)


@pytest.mark.parametrize("shape", SHAPES[:6])
@pytest.mark.parametrize("code", CODES, ids=["nf4", "fp4", "int4", "user"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_quantize_equals_reference(shape, code, blocksize):
    x = torch.randn(shape) * 3
    q = nf4lib.quantize(x, blocksize=blocksize, code=code)
    packed, absmax = _reference(x, blocksize, code)
    assert np.array_equal(q.packed.numpy(), packed)
    assert np.array_equal(q.absmax.numpy(), absmax)
    levels = q.code.numpy()
    expect = ref.dequantize(packed, absmax, levels, x.numel(), blocksize).reshape(shape)
    assert np.array_equal(nf4lib.dequantize(q).numpy(), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_equals_bitsandbytes(bnb, dtype, shape, quant_type):
    bnb_f = bnb.functional
    x = torch.randn(shape, dtype=dtype)
    for blocksize in (64, 4096) if math.prod(shape) > 1000 else (32, 64):
        q = nf4lib.quantize(x, blocksize=blocksize, code=quant_type)
        packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(q.packed, packed.view(-1))
        assert torch.equal(q.absmax, state.absmax)
        ours, theirs = nf4lib.dequantize(q), bnb_dequantize_4bit(packed, state)
        assert ours.shape == x.shape  # (bitsandbytes returns some 1-D shapes as (1, n))
        assert torch.equal(ours, theirs.reshape(x.shape))


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_equals_bitsandbytes(bnb, blocksize):
    bnb_f = bnb.functional
    x = torch.randn(4 * blocksize + 3, dtype=torch.bfloat16)
    q = nf4lib.quantize(x, blocksize=blocksize)
    packed, state = bnb_f.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)


def test_large_tensor_fast_paths_equal_eager_and_bitsandbytes(bnb, monkeypatch):
    """Above 2M elements quantize uses the compiled kernel and dequantize the chunked one."""
    bnb_f = bnb.functional
    x = torch.randn(2048, 1024 + 64, dtype=torch.bfloat16)
    q = nf4lib.quantize(x)
    packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    monkeypatch.setenv("NF4LIB_COMPILE", "0")
    q_eager = nf4lib.quantize(x)
    assert torch.equal(q.packed, q_eager.packed) and torch.equal(q.absmax, q_eager.absmax)
    fast = nf4lib.dequantize(q)
    pure = default.dequantize(q, x.dtype)
    assert torch.equal(fast, pure)


def test_padding_nibble_is_quantized_zero():
    q = nf4lib.quantize(torch.randn(5))
    assert q.packed.numel() == 3
    assert q.packed[-1].item() & 15 == 7  # NF4 level 7 is 0.0


def test_all_zero_block_gives_exact_zeros():
    x = torch.randn(266)
    x[64:128] = 0  # a whole zero block
    x[256:] = 0  # a zero partial last block (10 elements)
    for code in ("nf4", "fp4", "int4"):
        w = nf4lib.dequantize(nf4lib.quantize(x, code=code))
        assert bool((w[64:128] == 0).all()) and bool((w[256:] == 0).all())


def test_empty_tensor():
    q = nf4lib.quantize(torch.empty(0, 4))
    assert q.packed.numel() == 0 and q.absmax.numel() == 0
    w = nf4lib.dequantize(q)
    assert w.shape == (0, 4) and w.dtype == torch.float32
    assert nf4lib.dequantize(nf4lib.quantize(torch.empty(0), double_quant=True)).shape == (0,)


def test_huge_finite_values_stay_finite():
    x = torch.tensor([1e30, -3e38, 3e38, 1.0] * 16)
    w = nf4lib.dequantize(nf4lib.quantize(x))
    assert bool(torch.isfinite(w).all())
    assert w.abs().max() == pytest.approx(3e38, rel=1e-6)


# Round-trip error limits published by bitsandbytes' own test suite
# (tests/test_functional.py::test_4bit_quant, randn(1024, 1024)): mean |err| and mean
# relative error must be below these, by blocksize.
def _bnb_limits(blocksize, quant_type):
    if blocksize <= 64:
        return 0.1, 0.28
    if blocksize <= 256:
        return 0.11, 0.3
    if blocksize <= 512:
        return 0.12, 0.31
    err = 0.08 + math.log2(blocksize) * 0.04 if quant_type == "fp4" else math.log2(blocksize) * 0.08
    return err, None


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_within_bitsandbytes_limits(blocksize, quant_type):
    x = torch.randn(1024, 1024)
    err = (nf4lib.dequantize(nf4lib.quantize(x, blocksize=blocksize, code=quant_type)) - x).abs()
    max_err, max_rel = _bnb_limits(blocksize, quant_type)
    assert err.mean().item() < max_err
    if max_rel is not None:
        assert (err / (x.abs() + 1e-8)).mean().item() < max_rel
    # every value is within half the widest level gap (1 - 0.7229568 for NF4) of its absmax
    if quant_type == "nf4":
        assert err.max().item() <= 0.5 * (1 - 0.7229568) * x.abs().max().item() + 1e-6


def test_nf4_beats_int4_on_gaussian():
    x = torch.randn(512, 512)
    e_nf4 = (nf4lib.dequantize(nf4lib.quantize(x)) - x).pow(2).mean()
    e_int4 = (nf4lib.dequantize(nf4lib.quantize(x, code="int4")) - x).pow(2).mean()
    assert e_nf4 < e_int4


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    blocksize=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from(DTYPES),
    code=st.sampled_from(["nf4", "fp4", "int4"]),
    scale=st.floats(1e-3, 1e3),
)
def test_property_round_trip(shape, blocksize, dtype, code, scale):
    x = (torch.randn(shape) * scale).to(dtype)
    q = nf4lib.quantize(x, blocksize=blocksize, code=code)
    n = x.numel()
    assert q.packed.shape == ((n + 1) // 2,) and q.absmax.shape == (-(-n // blocksize),)
    w = nf4lib.dequantize(q)
    assert w.shape == x.shape and w.dtype == dtype
    # every dequantized value is a level times its block's absmax, in float32 then cast
    xf = x.float().reshape(-1)
    blocks = torch.arange(n) // blocksize
    assert bool((w.float().reshape(-1).abs() <= q.absmax[blocks] * (1 + 1e-2)).all())
    # absmax is each block's largest magnitude (a zero partial last block stores 1e-38)
    block_max = torch.stack([xf[b * blocksize : (b + 1) * blocksize].abs().max() for b in range(len(q.absmax))])
    if n % blocksize:
        block_max[-1] = block_max[-1].clamp(min=1e-38)
    assert torch.equal(q.absmax, block_max)
    assert np.array_equal(q.packed.numpy(), _reference(x, blocksize, code)[0])


@settings(max_examples=30, deadline=None)
@given(levels=st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=16, unique=True), n=st.integers(1, 200))
def test_property_user_codebook(levels, n):
    code = torch.tensor(sorted(levels), dtype=torch.float32)
    x = torch.randn(n)
    q = nf4lib.quantize(x, blocksize=32, code=code)
    packed, absmax = _reference(x, 32, code)
    assert np.array_equal(q.packed.numpy(), packed) and np.array_equal(q.absmax.numpy(), absmax)
    w = nf4lib.dequantize(q)
    # each output is code[k] * absmax for some k: the value it was rounded to
    blocks = torch.arange(n) // 32
    ratios = w / q.absmax[blocks].clamp(min=1e-30)
    assert bool(torch.isclose(ratios[:, None], code[None, :], atol=1e-5).any(dim=1).all())


def test_record_is_immutable_and_rebuildable():
    q = nf4lib.quantize(torch.randn(10, 10))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.blocksize = 32
    q2 = dataclasses.replace(q, dtype=torch.bfloat16)
    assert q2.dtype == torch.bfloat16 and q.dtype == torch.float32
    moved = q.to("cpu")
    assert torch.equal(moved.packed, q.packed) and moved.shape == (10, 10)
    dq = nf4lib.quantize(torch.randn(10, 10), double_quant=True)
    copied = dq.to("cpu", copy=True)
    for a, b in ((copied.packed, dq.packed), (copied.absmax.codes, dq.absmax.codes), (copied.code, dq.code)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert dq.to("cpu").packed.data_ptr() == dq.packed.data_ptr()  # no copy unless asked
    leaves, spec = torch.utils._pytree.tree_flatten(q)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    assert torch.utils._pytree.tree_unflatten(leaves, spec).shape == q.shape


def test_inputs_are_not_modified():
    x = torch.randn(300, dtype=torch.bfloat16)
    before = x.clone()
    nf4lib.quantize(x, double_quant=True)
    assert torch.equal(x, before)


# ---- bad input -------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_value_error_with_count_and_block(bad):
    x = torch.randn(1000)
    x[130] = bad
    x[900] = bad
    with pytest.raises(ValueError, match=r"2 NaN/Inf.*element 130 \(block 2"):
        nf4lib.quantize(x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.uint8, torch.float64])
def test_non_float_input_is_type_error(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        nf4lib.quantize(torch.zeros(64, dtype=dtype))


def test_non_tensor_is_type_error():
    with pytest.raises(TypeError, match="list"):
        nf4lib.quantize([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [0, 48, 100, 8, 2**17, 64.0, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        nf4lib.quantize(torch.randn(256), blocksize=blocksize)


def test_dequantize_rejects_records_that_do_not_fit():
    q = nf4lib.quantize(torch.randn(100, 10))
    with pytest.raises(ValueError, match="packed"):
        nf4lib.dequantize(dataclasses.replace(q, packed=q.packed[:-1]))
    with pytest.raises(ValueError, match="absmax"):
        nf4lib.dequantize(dataclasses.replace(q, absmax=q.absmax[:-1]))
    with pytest.raises(ValueError, match="packed"):
        nf4lib.dequantize(dataclasses.replace(q, shape=(100, 11)))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        nf4lib.dequantize(torch.zeros(3))


# ---- transforms --------------------------------------------------------------


def test_quantize_and_dequantize_under_compile_fullgraph():
    x = torch.randn(64, 96)

    @torch.compile(fullgraph=True, backend="eager")
    def round_trip(t):
        return nf4lib.dequantize(nf4lib.quantize(t))

    assert torch.equal(round_trip(x), nf4lib.dequantize(nf4lib.quantize(x)))


def test_vmap_over_stack_of_weights():
    stack = torch.randn(3, 32, 64)
    qs = torch.func.vmap(nf4lib.quantize)(stack)
    assert qs.packed.shape == (3, 32 * 64 // 2)
    ws = torch.func.vmap(nf4lib.dequantize)(qs)
    for i in range(3):
        q = nf4lib.quantize(stack[i])
        assert torch.equal(qs.packed[i], q.packed) and torch.equal(qs.absmax[i], q.absmax)
        assert torch.equal(ws[i], nf4lib.dequantize(q))
