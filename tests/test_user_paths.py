"""What a bitsandbytes user expects, run as a user would: every model family converts,
memory reads as 4-bit memory, every way of saving loads back, and what cannot work says so.

Each test is one path a user takes, through the public API only.
"""

import copy
import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nf4lib
from nf4lib import analysis

pytestmark = pytest.mark.integration


def _llama(transformers, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def _gpt2(transformers, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _count_nf4(model) -> int:
    return sum(isinstance(m, nf4lib.NF4Linear) for m in model.modules())


IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- GPT-2 (Conv1D)


def test_gpt2_converts_like_bitsandbytes_through_every_entry_point(transformers, bnb, tmp_path):
    import nf4lib.hf
    import bitsandbytes.functional as bnb_f

    model = _gpt2(transformers)
    q = nf4lib.convert(model)
    assert _count_nf4(q) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block; lm_head is tied to wte
    conv = model.transformer.h[0].attn.c_attn
    layer = q.transformer.h[0].attn.c_attn
    assert (layer.out_features, layer.in_features) == (conv.nf, conv.weight.shape[0])
    assert torch.equal(layer.dequantize(), nf4lib.dequantize(nf4lib.quantize(conv.weight.detach().t().contiguous())))
    with torch.no_grad():
        ref, got = model(IDS).logits, q(IDS).logits
    assert (got - ref).abs().max() < 0.2 * ref.abs().max()

    model.save_pretrained(tmp_path / "fp")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=nf4lib.hf.NF4Config())
    assert _count_nf4(loaded) == 8
    sd, sd_loaded = q.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys() and all(torch.equal(sd[k], sd_loaded[k]) for k in sd)

    records = analysis.compare_model(model, settings=("nf4",))
    assert len(records) == 8

    q.save_pretrained(tmp_path / "q")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    w = theirs.transformer.h[0].attn.c_attn.weight
    assert type(theirs.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    assert torch.equal(bnb_f.dequantize_4bit(w.data, w.quant_state).reshape(-1), layer.dequantize().reshape(-1).float())


def test_quantize_on_load_that_quantizes_nothing_warns(transformers, tmp_path):
    import nf4lib.hf

    _llama(transformers).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no layer"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=nf4lib.hf.NF4Config(exclude=["model", "lm_head"]))


def test_a_conversion_that_converts_nothing_warns():
    with pytest.warns(UserWarning, match="no layer"):
        nf4lib.convert(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))
    with pytest.warns(UserWarning, match="no layer"):
        nf4lib.convert(nn.Sequential(nn.Linear(64, 64)), exclude=lambda m, n: True)


# ----------------------------------------------------------------------------- memory


def test_memory_reads_as_4bit_memory(transformers, tmp_path):
    import nf4lib.hf
    from transformers.integrations.accelerate import compute_module_sizes

    model = _llama(transformers, hidden_size=128, intermediate_size=256)
    q = nf4lib.convert(model)
    real = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert abs(q.get_memory_footprint() - real) <= 0.05 * real
    assert q.get_memory_footprint() < 0.45 * model.get_memory_footprint()
    assert q.num_parameters() == model.num_parameters()  # counts and shapes are the model's
    assert q.model.layers[0].mlp.up_proj.weight.shape == model.model.layers[0].mlp.up_proj.weight.shape

    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=nf4lib.hf.NF4Config())
    sizes, _ = compute_module_sizes(loaded, loaded.hf_quantizer)  # what device_map planning adds up
    assert abs(sizes[""] - real) <= 0.05 * real
    assert abs(loaded.get_memory_footprint() - real) <= 0.05 * real


def test_report_states_the_bytes_the_quantized_file_has(transformers, tmp_path):
    from nf4lib.tools.cli import main

    model = _llama(transformers, hidden_size=128, intermediate_size=256)
    model.save_pretrained(tmp_path / "m")
    out = subprocess.run([sys.executable, "-m", "nf4lib", "report", str(tmp_path / "m"), "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    claimed = json.loads(out.stdout)["checkpoint"]["bytes_after"]["nf4"]
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q.safetensors")]) == 0
    real = os.path.getsize(tmp_path / "q.safetensors")
    assert abs(claimed - real) <= 0.05 * real


# ----------------------------------------------------------------------------- saving and loading back


def test_qat_and_loftq_models_save_for_transformers_and_bitsandbytes(transformers, bnb, tmp_path):
    model = _llama(transformers)
    for name, q in (("qat", nf4lib.finalize_qat(nf4lib.prepare_qat(model))), ("loftq", nf4lib.loftq_convert(model, 4)[0])):
        q.save_pretrained(tmp_path / name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        sd = q.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in theirs.state_dict().items() if k in sd and "quant_state" not in k)


def test_pickling_torch_save_and_export_keep_4bit_parameters(tmp_path):
    torch.manual_seed(0)
    q = nf4lib.convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), exclude=())
    x = torch.randn(3, 64)
    torch.save(q, tmp_path / "m.pt")
    for back in (torch.load(tmp_path / "m.pt", weights_only=False), pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert isinstance(back[0].weight, nn.Parameter) and isinstance(back[0].weight, nf4lib.NF4Tensor)
        back[0].weight = back[0].weight  # a Module only takes Parameters here
        assert torch.equal(back(x), q(x))
    ep = torch.export.export(q, (x,))
    torch.export.save(ep, tmp_path / "m.pt2")
    assert torch.equal(torch.export.load(tmp_path / "m.pt2").module()(x), q(x))


def test_transformers_dequantize_returns_a_dense_model(transformers, tmp_path):
    import nf4lib.hf

    _llama(transformers).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=nf4lib.hf.NF4Config())
    expected = nf4lib.dequantize_model(loaded)
    dense = loaded.dequantize()
    assert _count_nf4(dense) == 0 and not hasattr(dense.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(dense(IDS).logits, expected(IDS).logits)


def test_a_converted_model_dequantizes_through_transformers_too(transformers):
    model = _llama(transformers)
    q = nf4lib.convert(model)
    expected = nf4lib.dequantize_model(q)
    dense = q.dequantize()
    assert dense is q and _count_nf4(dense) == 0 and not hasattr(dense.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(dense(IDS).logits, expected(IDS).logits)


def test_the_cli_writes_a_model_directory_that_from_pretrained_loads(transformers, bnb, tmp_path):
    from nf4lib.tools.cli import main

    model = _llama(transformers)
    model.save_pretrained(tmp_path / "in")
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # nothing else left beside it
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    sd = nf4lib.convert(model).state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in theirs.state_dict().items() if k in sd and "quant_state" not in k)
    # a file IN cannot make a model directory: one clear line, nothing written
    from safetensors.torch import save_file

    save_file({"l.weight": torch.randn(64, 64)}, str(tmp_path / "f.safetensors"))
    assert main(["quantize", str(tmp_path / "f.safetensors"), str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()


def test_the_cli_quantizes_float64_checkpoints_and_says_so(tmp_path, capsys):
    from safetensors.torch import save_file
    from nf4lib.tools.cli import main

    w = torch.randn(64, 64, dtype=torch.float64)
    save_file({"l.weight": w, "l.bias": torch.zeros(64, dtype=torch.float64)}, str(tmp_path / "in.safetensors"))
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "1 quantized" in captured.out and "float64" in captured.err
    holder = nn.Module()
    holder.l = nn.Linear(64, 64)
    model = nf4lib.convert(holder, exclude=())
    nf4lib.load_quantized(model, tmp_path / "out.safetensors")
    assert torch.equal(model.l.dequantize(), nf4lib.dequantize(nf4lib.quantize(w.float())))


# ----------------------------------------------------------------------------- wrong without a word


def test_yes_no_options_must_be_bools():
    for call in (lambda: nf4lib.quantize(torch.randn(64), double_quant="no"),
                 lambda: nf4lib.convert(nn.Linear(64, 64), double_quant="no"),
                 lambda: nf4lib.NF4Linear(64, 64, double_quant=1)):
        with pytest.raises(TypeError, match="double_quant"):
            call()


def test_analysis_refuses_what_it_cannot_measure():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="NF4 already"):
        analysis.compare_model(nf4lib.convert(model, exclude=()))
    x = torch.randn(64)
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        analysis.error_metrics(bad, x)
    with pytest.raises(ValueError, match="NaN"):
        analysis.error_metrics(x, bad)


def test_asking_for_a_gradient_on_a_4bit_weight_warns():
    q = nf4lib.convert(nn.Sequential(nn.Linear(64, 64)), exclude=())
    with pytest.warns(UserWarning, match="frozen"):
        q[0].weight.requires_grad_(True)


def test_collectives_on_a_bare_4bit_weight_raise():
    import torch.distributed as dist

    w = nf4lib.NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(64, 64)))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        with pytest.raises(TypeError, match="collectives"):
            dist.broadcast(w, 0)
        with pytest.raises(TypeError, match="collectives"):
            dist.all_reduce(w)
    finally:
        dist.destroy_process_group()


def test_copying_into_a_view_of_the_weight_writes_the_weight():
    w = nf4lib.NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(64, 64)))
    dense = torch.randn(64 * 64)
    w.view(-1).copy_(dense)
    assert torch.equal(w.dequantize().reshape(-1), nf4lib.dequantize(nf4lib.quantize(dense)))


def test_fp4_stores_positive_zero_as_bitsandbytes_does(bnb):
    import bitsandbytes.functional as bnb_f

    ours, theirs = nf4lib.fp4_levels(), bnb_f.get_4bit_type("fp4", device="cpu")
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))  # bits, not values
    zeros = nf4lib.dequantize(nf4lib.quantize(torch.zeros(64), code="fp4"))
    assert not torch.signbit(zeros).any()


def test_one_numerical_path_whatever_needs_a_gradient_or_compiles():
    torch.manual_seed(0)
    layer = nf4lib.convert(nn.Sequential(nn.Linear(256, 128)), exclude=(), compute_dtype=torch.bfloat16)[0]
    for rows in (1, 4, 40):
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = layer(x)
        xg = x.clone().requires_grad_(True)
        assert torch.equal(layer(xg), ref), rows
        compiled = torch.compile(layer, fullgraph=True)
        with torch.no_grad():
            assert torch.equal(compiled(x), ref), rows
        assert torch.equal(compiled(xg), ref), rows


def test_the_compile_and_vmap_claims_hold():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    eager = nf4lib.fake_quantize(w, scale="mse")
    assert torch.equal(torch.compile(lambda t: nf4lib.fake_quantize(t, scale="mse"), fullgraph=True)(w), eager)
    batch = torch.randn(3, 64, 128)
    got = torch.func.vmap(lambda t: nf4lib.fake_quantize(t, scale="mse"))(batch)
    assert all(torch.equal(got[i], nf4lib.fake_quantize(batch[i], scale="mse")) for i in range(3))
    round_trip = lambda t: nf4lib.dequantize(nf4lib.quantize(t, double_quant=True))  # noqa: E731
    # inductor sums the absmax mean (the double-quant offset) in its own order: the last bit may differ
    assert torch.allclose(torch.compile(round_trip, fullgraph=True)(w), round_trip(w), rtol=1e-6, atol=1e-6)
    got = torch.func.vmap(round_trip)(batch)
    assert all(torch.equal(got[i], round_trip(batch[i])) for i in range(3))
    qat = nf4lib.prepare_qat(nn.Sequential(nn.Linear(128, 64)), scale="mse", exclude=())
    x = torch.randn(2, 128)
    assert torch.allclose(torch.compile(qat, fullgraph=True)(x), qat(x), rtol=1e-5, atol=1e-6)


def test_save_pretrained_refuses_settings_bitsandbytes_cannot_read_before_writing(transformers, tmp_path):
    model = _llama(transformers)
    for kwargs in (dict(code="int4"), dict(blocksize=16), dict(code=torch.linspace(-1, 1, 16))):
        q = nf4lib.convert(model, **kwargs)
        with pytest.raises(ValueError, match="save_quantized"):
            q.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()
        pickle.loads(pickle.dumps(q))  # the guard does not stop pickling
        nf4lib.save_quantized(q, tmp_path / "q.safetensors")  # the way that works
        nf4lib.dequantize_model(q).save_pretrained(tmp_path / "dense")  # a dense model saves again
    ok = nf4lib.convert(model)
    ok.save_pretrained(tmp_path / "nf4")
    assert (tmp_path / "nf4" / "config.json").exists()
