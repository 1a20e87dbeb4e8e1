"""GPTQ on the NF4 grid: the reference, RTN as the H = I case, lower error, bad input, calibrate."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nf4lib
from nf4lib.core.codebooks import code_tables
from nf4lib.core.encode import sorted_levels
from nf4lib.gptq import calibrate, gptq_quantize, input_hessian, layer_output_error
from reference import gptq as ref


def _inputs(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with unequal scales: where GPTQ has something to do
    return torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g) * 0.2 + torch.randn(n, generator=g)


def _codes(q):
    """Sorted level index per element (the identity storage order of NF4)."""
    p = q.packed
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)[: q.numel].reshape(q.shape).long()


@pytest.mark.parametrize("code,bs", [("nf4", 32), ("nf4", 64), ("int4", 64)])
def test_equals_the_numpy_reference(code, bs):
    w = torch.randn(48, 128) * 0.05
    h = input_hessian(_inputs(600, 128))
    q = gptq_quantize(w, h, blocksize=bs, code=code, block_columns=64)  # lazy batches of 64 columns
    levels, thresholds, to_storage, _ = code_tables(code)
    want_q, want_s, want_w = ref.gptq(w.numpy(), h.numpy(), sorted_levels(levels, to_storage).numpy(),
                                      thresholds.numpy(), bs)
    np.testing.assert_array_equal(_codes(q).numpy(), want_q)
    np.testing.assert_array_equal(q.absmax.reshape(48, -1).numpy(), want_s)
    np.testing.assert_array_equal(nf4lib.dequantize(q).numpy(), want_w)


@pytest.mark.parametrize("kw", [{}, {"scale": "mse"}, {"code": "fp4"}, {"double_quant": True},
                                {"blocksize": 128, "act_order": True}, {"code": torch.linspace(-1, 1, 16)}])
def test_identity_hessian_is_round_to_nearest_bit_for_bit(kw):
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    q = gptq_quantize(w, torch.eye(256) * 3.0, **kw)
    r = nf4lib.quantize(w, **{k: v for k, v in kw.items() if k != "act_order"})
    assert torch.equal(q.packed, r.packed) and q.dtype == torch.bfloat16 and q.shape == (64, 256)
    assert torch.equal(nf4lib.dequantize(q), nf4lib.dequantize(r))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), act_order=st.booleans(), scale=st.sampled_from(["absmax", "mse"]))
def test_error_on_the_calibration_data_is_never_above_round_to_nearest(seed, act_order, scale):
    torch.manual_seed(seed)
    w = torch.randn(32, 128) * 0.05
    h = input_hessian(_inputs(1000, 128, seed))  # 1000 rows, 128 inputs: well conditioned
    q = gptq_quantize(w, h, act_order=act_order, scale=scale)
    rtn = nf4lib.quantize(w, scale=scale)
    e_gptq = layer_output_error(w, nf4lib.dequantize(q), h)
    e_rtn = layer_output_error(w, nf4lib.dequantize(rtn), h)
    assert e_gptq <= e_rtn * 1.001, (e_gptq, e_rtn)


def test_output_error_identity():
    x = _inputs(50, 64)
    w, w_hat = torch.randn(8, 64), torch.randn(8, 64)
    want = float(((x.double() @ w.double().t() - x.double() @ w_hat.double().t()) ** 2).sum())
    assert layer_output_error(w, w_hat, input_hessian(x)) == pytest.approx(want, rel=1e-9)


def test_act_order_keeps_blocks_whole_and_the_input_unmodified():
    w = torch.randn(16, 256) * 0.05
    keep = w.clone()
    x = _inputs(500, 256)
    x[:, 200:] *= 20  # the last block dominates: quantized first
    q = gptq_quantize(w, input_hessian(x), act_order=True)
    assert torch.equal(w, keep)
    assert q.absmax.shape == (16 * 4,)  # one scale per (row, block), in bitsandbytes' order
    back = nf4lib.dequantize(q).reshape(16, 4, 64)
    assert torch.all(back.abs().amax(2) <= q.absmax.reshape(16, 4) * (1 + 1e-6))


def test_bitsandbytes_reads_the_result(bnb):
    from _oracles import bnb_dequantize_4bit

    w = torch.randn(64, 128) * 0.05
    for dq in (False, True):
        q = gptq_quantize(w, input_hessian(_inputs(400, 128)), double_quant=dq)
        sd = nf4lib.to_bnb(q)
        state = bnb.functional.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"},
                                                    device=torch.device("cpu"))
        assert torch.equal(bnb_dequantize_4bit(sd["weight"], state), nf4lib.dequantize(q))


def test_bad_input_gets_a_clear_error():
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match=r"hessian must be \(in_features, in_features\) = \(64, 64\)"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(64) - torch.ones(64, 64), damp=0.0)
    with pytest.raises(ValueError, match="hessian holds NaN"):
        gptq_quantize(w, h * float("nan"))
    with pytest.raises(ValueError, match="weight holds 8 NaN"):  # one column of 8 rows
        gptq_quantize(torch.where(torch.arange(64) == 3, float("nan"), w), h)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        gptq_quantize(torch.randn(8, 96), torch.eye(96))
    with pytest.raises(ValueError, match="damp must be"):
        gptq_quantize(w, h, damp=-1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        gptq_quantize(w.long(), h)
    with pytest.raises(ValueError, match="calibration inputs hold 1 NaN"):
        input_hessian(torch.tensor([[1.0, float("nan")]]))


# ----------------------------------------------------------------------------- calibrate


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, *, scale=1.0):
        return x + self.down(torch.relu(self.up(x))) * scale


class _Net(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(3))
        self.lm_head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.lm_head(h)


def test_calibrate_quantizes_every_layer_in_order_and_beats_rtn_on_held_out_data():
    torch.manual_seed(0)
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mix = torch.randn(64, 64) * 0.5
    data = [torch.randn(64, 64) @ mix for _ in range(8)]
    qmodel, report = calibrate(net, data[:6], holdout=1 / 3, damp=(0.01, 0.1), progress=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # input untouched
    names = [r["layer"] for r in report]
    assert names == ["inp"] + [f"blocks.{i}.{n}" for i in range(3) for n in ("up", "down")]  # in the order they run
    assert isinstance(qmodel.blocks[0].up, nf4lib.NF4Linear) and isinstance(qmodel.inp, nf4lib.NF4Linear)
    assert type(qmodel.lm_head) is nn.Linear  # excluded as in convert
    assert all(r["choice"] in ("gptq", "rtn", "rtn-mse") and r["heldout"] is not None for r in report)
    assert all((r["damp"] in (0.01, 0.1)) == (r["choice"] == "gptq") for r in report)  # the held-out damping
    chosen = [r["heldout"][r["choice"]] for r in report]
    assert all(c <= min(r["heldout"].values()) for c, r in zip(chosen, report))  # the held-out winner
    test = torch.cat(data[6:])
    with torch.no_grad():
        err = lambda m: float((m(test) - net(test)).pow(2).mean())  # noqa: E731
        assert err(qmodel) < 0.8 * err(nf4lib.convert(net))  # measured: 0.70x


def test_calibrate_without_holdout_uses_gptq_and_refuses_bad_input():
    torch.manual_seed(0)
    net = _Net()
    _, report = calibrate(net, [torch.randn(32, 64)], progress=False)
    assert {r["choice"] for r in report} == {"gptq"} and all(r["heldout"] is None for r in report)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        calibrate(net, [])
    with pytest.raises(ValueError, match="NaN/Inf"):
        calibrate(net, [torch.full((4, 64), float("nan"))])
    with pytest.raises(ValueError, match="holdout must be"):
        calibrate(net, [torch.randn(4, 64)], holdout=1.0)


def test_calibrate_llama_saves_for_bitsandbytes(transformers, bnb, tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=200, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 200, (2, 16))} for _ in range(4)]
    qmodel, report = calibrate(model, batches, progress=False)
    assert len(report) == 14  # 7 per layer; lm_head excluded
    qmodel.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 200, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, qmodel(ids).logits, rtol=1e-4, atol=1e-4)
    w = loaded.model.layers[0].mlp.down_proj.weight
    assert type(w).__name__ == "Params4bit"
    assert torch.equal(w.data.reshape(-1), qmodel.model.layers[0].mlp.down_proj.quantized.packed)
