"""Layer 1: codebooks against published constants and the numpy reference."""

import numpy as np
import pytest
import torch

import nf4lib
from reference import nf4 as ref

# The 16 NF4 values bitsandbytes ships (bitsandbytes/functional.py, get_4bit_type("nf4")),
# published with QLoRA (Dettmers et al. 2023, appendix E).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_equals_published_table_bit_for_bit():
    levels = nf4lib.nf4_levels()
    assert levels.dtype == torch.float32
    assert torch.equal(levels, torch.tensor(BNB_NF4, dtype=torch.float32))


def test_nf4_equals_bitsandbytes_table(bnb):
    bnb_f = bnb.functional
    assert torch.equal(nf4lib.nf4_levels(), bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4lib.fp4_levels(), bnb_f.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_normal_float_matches_reference(bits, symmetric):
    levels = nf4lib.normal_float_levels(bits, symmetric=symmetric)
    assert levels.shape == (2**bits,)
    assert np.array_equal(levels.numpy(), ref.normal_float(bits, symmetric))
    assert levels.max() == 1.0 and levels.min() >= -1.0
    assert bool((levels[1:] > levels[:-1]).all())
    if symmetric:
        assert levels.min() == -1.0 and not bool((levels == 0).any())
        assert torch.equal(levels, -levels.flip(0))  # symmetric about zero
    else:
        assert int((levels == 0).sum()) == 1  # exactly one exact zero
        assert int((levels > 0).sum()) == 2 ** (bits - 1)  # one more positive than negative


def test_int4_and_fp4_levels():
    assert torch.equal(nf4lib.int4_levels(), torch.arange(-7, 8, dtype=torch.float32) / 7)
    fp4 = nf4lib.fp4_levels()
    assert np.array_equal(fp4.numpy(), ref.fp4())
    assert fp4[3] == 1.0 and fp4[11] == -1.0 and fp4[1] == pytest.approx(0.0625 / 12)


@pytest.mark.parametrize("bits", [1, 9, 2.0, True])
def test_normal_float_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        nf4lib.normal_float_levels(bits)


@pytest.mark.parametrize(
    "code, match",
    [
        (torch.linspace(-1, 1, 17), "1..16 levels"),
        (torch.tensor([0.5, -0.5]), "sorted"),
        (torch.tensor([-2.0, 0.0, 1.0]), r"\[-1, 1\]"),
        (torch.tensor([[0.0, 1.0]]), "1-D"),
        ("nf5", "unknown code"),
    ],
)
def test_bad_codebooks(code, match):
    with pytest.raises(ValueError, match=match):
        nf4lib.quantize(torch.randn(64), code=code)


def test_integer_codebook_is_type_error():
    with pytest.raises(TypeError, match="floating point"):
        nf4lib.quantize(torch.randn(64), code=torch.tensor([0, 1]))


def test_dynamic_map_matches_bitsandbytes(bnb):
    bnb_f = bnb.functional
    assert torch.equal(nf4lib.dynamic_map(), bnb_f.create_dynamic_map(signed=True))
    ours = ref.dynamic_map()
    # the reference builds its float32 linspace differently: at most 1 ulp apart
    assert np.allclose(ours, nf4lib.dynamic_map().numpy(), rtol=2.4e-7, atol=0)
