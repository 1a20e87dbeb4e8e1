"""Double quantization of absmax: reference, bitsandbytes, memory."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nf4lib
from reference import nf4 as ref


@pytest.mark.parametrize("n", [1, 5, 256, 257, 1000, 4096])
def test_double_quantize_equals_reference(n):
    absmax = torch.rand(n) * 3
    dq = nf4lib.double_quantize(absmax)
    code = dq.code.numpy()
    codes, scales = ref.double_quantize(absmax.numpy(), dq.offset.item(), code)
    assert dq.offset.item() == pytest.approx(float(np.mean(absmax.numpy(), dtype=np.float64)), rel=1e-6)
    assert np.array_equal(dq.codes.numpy(), codes)
    assert np.array_equal(dq.scales.numpy(), scales)
    back = ref.double_dequantize(codes, scales, dq.offset.item(), code)
    assert np.array_equal(nf4lib.double_dequantize(dq).numpy(), back)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 64), (333, 77), (64 * 257 + 3,)])
def test_double_quant_matches_bitsandbytes(bnb, shape, dtype):
    bnb_f = bnb.functional
    x = torch.randn(shape, dtype=dtype)
    q = nf4lib.quantize(x, double_quant=True)
    packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    dq = q.absmax
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(dq.offset, state.offset)
    assert torch.equal(dq.scales, state.state2.absmax)
    assert torch.equal(dq.code, state.state2.code)
    assert torch.equal(dq.codes, state.absmax)  # every 8-bit code
    assert torch.equal(nf4lib.dequantize(q), bnb_f.dequantize_4bit(packed, state))


def _awkward_values():
    """Values where a grid-based 8-bit rounding and a nearest search part ways or break."""
    code = nf4lib.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    j = torch.arange(65536, dtype=torch.float32)
    grid = (j + j) / torch.tensor(65535.0) - 1.0
    bits = torch.randint(0, 2**31, (1 << 16,), generator=torch.Generator().manual_seed(0))
    any_float = bits.to(torch.int32).view(torch.float32)
    any_float = any_float[any_float.isfinite()]
    return [
        torch.cat([mids, up, down, code, torch.tensor([1.0])]),  # boundaries, +-1 ulp
        grid,
        torch.cat([grid, -grid.flip(0)]) * 0.37,
        any_float,  # every exponent: scale ~3e38, groups of 1e-40 and 0
        torch.zeros(300),  # scale 0
        torch.tensor([1e-40, 0.0, -1e-41, 3e-45]),  # subnormal scale: 1 / scale = inf
    ]


@pytest.mark.parametrize("case", range(6))
def test_8bit_codes_match_bitsandbytes_on_awkward_values(bnb, case):
    """The grid rounding equals bitsandbytes' kernel on boundaries, grid points, every
    exponent, zero and subnormal scales (``quantize_blockwise`` is its 8-bit entry point)."""
    bnb_f = bnb.functional
    from nf4lib.core.double import _grid_codes, _grid_table_cached

    values = _awkward_values()[case]
    theirs, state = bnb_f.quantize_blockwise(values, blocksize=256)
    n = values.numel()
    groups = torch.nn.functional.pad(values, (0, (-n) % 256)).view(-1, 256)
    scales = groups.abs().amax(dim=1)
    ours = _grid_codes(groups, scales, _grid_table_cached()).reshape(-1)[:n]
    assert torch.equal(scales, state.absmax)
    assert torch.equal(ours, theirs)
    if n <= 2048:  # the reference is a Python loop
        codes, _ = ref.double_quantize(values.numpy(), 0.0, nf4lib.dynamic_map().numpy())
        assert np.array_equal(codes, theirs.numpy())


@settings(max_examples=200, deadline=None)
@given(st.floats(-1.0, 1.0, width=32))
def test_grid_code_is_nearest_up_to_the_grid_step(v):
    """Rounding through the 65,536-point grid costs at most two half-steps (2/65535) of
    distance against the nearest code (near 0, where codes lie 1e-7 apart, that spans
    many codes): |code[g] - v| <= |code[g] - p| + |p - v|
    <= |code[n] - p| + |p - v| <= |code[n] - v| + 2 |p - v|, with |p - v| <= 1/65535."""
    code = nf4lib.dynamic_map().numpy()
    g = ref.grid_code(np.float32(v), code)
    nearest = int(np.argmin(np.abs(code - np.float32(v))))
    assert abs(code[g] - v) <= abs(code[nearest] - v) + 2 / 65535 + 1e-7


def test_bitsandbytes_double_quant_state_dequantizes_identically(bnb):
    """Loading bitsandbytes' own codes gives bitsandbytes' weights exactly."""
    bnb_f = bnb.functional
    x = torch.randn(300, 200, dtype=torch.float16)
    packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    dq = nf4lib.DoubleQuantized(state.absmax, state.state2.absmax, state.offset, state.state2.code, 256)
    q = nf4lib.QuantizedTensor(packed.view(-1), dq, nf4lib.nf4_levels(), (300, 200), torch.float16, 64)
    assert torch.equal(nf4lib.dequantize(q), bnb_f.dequantize_4bit(packed, state))


def test_bits_per_parameter():
    x = torch.randn(4096, 4096)
    assert nf4lib.bits_per_parameter(nf4lib.quantize(x)) == 4.5
    assert round(nf4lib.bits_per_parameter(nf4lib.quantize(x, double_quant=True)), 3) == 4.127


def test_double_quant_round_trip_error_is_small():
    x = torch.randn(512, 512)
    plain = nf4lib.dequantize(nf4lib.quantize(x))
    dq = nf4lib.dequantize(nf4lib.quantize(x, double_quant=True))
    # 8-bit absmax adds well under 1% to the 4-bit error (QLoRA reports no loss in accuracy)
    e_plain, e_dq = (plain - x).pow(2).mean(), (dq - x).pow(2).mean()
    assert e_dq < e_plain * 1.01


def test_double_quantize_bad_input():
    with pytest.raises(TypeError, match="float32"):
        nf4lib.double_quantize(torch.rand(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="blocksize"):
        nf4lib.double_quantize(torch.rand(10), blocksize=100)
