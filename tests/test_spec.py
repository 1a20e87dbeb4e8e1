"""One settings object (QuantSpec), one name per concept, and the tree transforms' one
storage policy."""

import copy
import warnings

import pytest
import torch
from torch import nn

import nf4lib
from nf4lib import QuantSpec


def test_spec_validates_once_and_is_immutable():
    spec = QuantSpec(blocksize=128, code="NF4", double_quant=True, scale="MSE")
    assert (spec.blocksize, spec.code, spec.double_quant, spec.scale) == (128, "nf4", True, "mse")
    assert spec.code_name == "nf4" and torch.equal(spec.levels, nf4lib.nf4_levels())
    with pytest.raises(Exception):
        spec.blocksize = 64  # frozen
    assert spec.replace(blocksize=64) == QuantSpec(blocksize=64, double_quant=True, scale="mse")
    assert hash(spec) == hash(QuantSpec(blocksize=128, double_quant=True, scale="mse"))
    for bad, err in (({"blocksize": 24}, ValueError), ({"code": "nf5"}, ValueError), ({"double_quant": "no"}, TypeError),
                     ({"scale": "rms"}, ValueError), ({"code": torch.tensor([1.0, -1.0])}, ValueError)):
        with pytest.raises(err):
            QuantSpec(**bad)
    user = QuantSpec(code=torch.linspace(-1, 1, 16, dtype=torch.float64))
    assert user.code.dtype == torch.float32 and user.code_name is None and "tensor(" in repr(user)


def test_every_quantizing_function_takes_the_spec_and_means_the_same():
    torch.manual_seed(0)
    spec = QuantSpec(blocksize=128, double_quant=True, scale="mse")
    lin = nn.Linear(256, 64)
    want = nf4lib.quantize(lin.weight.detach(), blocksize=128, double_quant=True, scale="mse")
    got = nf4lib.quantize(lin.weight.detach(), spec=spec)
    assert torch.equal(got.packed, want.packed) and torch.equal(got.absmax.codes, want.absmax.codes)
    layer = nf4lib.NF4Linear.from_linear(lin, spec=spec)
    assert torch.equal(layer.weight.packed, want.packed) and layer.blocksize == 128 and layer.double_quant
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 256))
    qmodel = nf4lib.convert(model, spec=spec)
    assert all(m.blocksize == 128 and m.double_quant for m in qmodel.modules() if isinstance(m, nf4lib.NF4Linear))
    empty = nf4lib.NF4Linear(256, 64, spec=spec)
    assert empty.blocksize == 128 and empty.double_quant
    r = nf4lib.loftq_init(lin, 4, iterations=1, spec=spec)
    assert r.quantized.blocksize == 128 and r.quantized.double_quant
    qat = nf4lib.prepare_qat(model, spec=QuantSpec(blocksize=32))
    assert {m.blocksize for m in qat.modules() if isinstance(m, nf4lib.QATLinear)} == {32}


def test_spec_and_keywords_together_are_refused():
    x = torch.randn(64, 64)
    with pytest.raises(ValueError, match="either as spec= or as keywords.*blocksize"):
        nf4lib.quantize(x, spec=QuantSpec(), blocksize=128)
    with pytest.raises(TypeError, match="spec must be a nf4lib.QuantSpec"):
        nf4lib.convert(nn.Linear(64, 64), spec={"blocksize": 64})
    # a keyword left at its default is not a clash
    assert nf4lib.quantize(x, spec=QuantSpec(blocksize=128), code="nf4").blocksize == 128


def test_old_spellings_work_for_one_release_with_a_deprecation_warning():
    x = torch.randn(64, 64)
    imp = torch.rand(64)
    with pytest.warns(DeprecationWarning, match="weights= is deprecated.*importance="):
        old = nf4lib.quantize(x, scale="mse", weights=imp)
    assert torch.equal(old.packed, nf4lib.quantize(x, scale="mse", importance=imp).packed)
    with pytest.raises(ValueError, match="pass only importance="):
        nf4lib.quantize(x, scale="mse", weights=imp, importance=imp)
    with pytest.warns(DeprecationWarning, match="blocksize= by keyword"):
        assert torch.equal(nf4lib.block_absmax(x, 32), nf4lib.block_absmax(x, blocksize=32))
    with pytest.warns(DeprecationWarning, match="iterations= by keyword"):
        old = nf4lib.loftq_init(x, 4, 1)
    assert old.errors == nf4lib.loftq_init(x, 4, iterations=1).errors
    with pytest.warns(DeprecationWarning, match="dtype= is deprecated.*factor_dtype="):
        assert nf4lib.loftq_init(x, 4, iterations=1, dtype=torch.float64).lora_A.dtype == torch.float64
    with pytest.warns(DeprecationWarning, match="mode= is deprecated.*scale="):
        layer = nf4lib.QATLinear(nn.Linear(64, 64), mode="learned")
    assert layer.mode == "learned" and layer.scale is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings warn about nothing
        nf4lib.QATLinear(nn.Linear(64, 64), scale="learned")
        nf4lib.loftq_init(x, 4, iterations=1)


@pytest.mark.parametrize("transform", ["convert", "dequantize_model", "prepare_qat", "finalize_qat", "loftq_convert"])
def test_every_tree_transform_returns_a_new_tree_sharing_the_layers_it_keeps(transform):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 32))
    if transform == "dequantize_model":
        model = nf4lib.convert(model)
    elif transform == "finalize_qat":
        model = nf4lib.prepare_qat(model)
    snapshot = copy.deepcopy(model.state_dict())
    fn = {"convert": nf4lib.convert, "dequantize_model": nf4lib.dequantize_model, "prepare_qat": nf4lib.prepare_qat,
          "finalize_qat": nf4lib.finalize_qat, "loftq_convert": lambda m: nf4lib.loftq_convert(m, 4, iterations=1)[0]}[transform]
    out = fn(model)
    assert out is not model and out[1] is not model[1] and out[1].weight is not model[1].weight
    # the norm and the embedding are new Parameters over the same storage
    assert out[1].weight.data_ptr() == model[1].weight.data_ptr()
    assert out[0].weight.data_ptr() == model[0].weight.data_ptr()
    # the input is left as it was
    after = model.state_dict()
    assert snapshot.keys() == after.keys()
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
