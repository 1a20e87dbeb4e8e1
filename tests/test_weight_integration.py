"""The NF4 weight as PyTorch's and the ecosystem's tools see it: distributed checkpoint
state dicts, safetensors, PEFT's parameter counts, a model's init_weights (integration)."""

import pytest
import torch

import nf4lib


def _llama(transformers, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _storages(model):
    """{storage pointer: [state-dict keys]} over every tensor a converted model stores."""
    seen = {}
    for k, t in model.state_dict().items():
        seen.setdefault(t.untyped_storage().data_ptr(), []).append(k)
    return seen


@pytest.mark.parametrize("double_quant", [False, True])
def test_distributed_checkpoint_state_dict_get_and_set(transformers, double_quant):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = nf4lib.convert(_llama(transformers), double_quant=double_quant)
    sd = get_model_state_dict(model)
    assert list(sd) == list(model.state_dict())  # every bitsandbytes key resolved by attribute
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    other = nf4lib.convert(_llama(transformers, seed=1), double_quant=double_quant)
    ids = torch.randint(0, 128, (2, 9))
    assert not torch.equal(other(ids).logits, model(ids).logits)
    params_before = dict(other.named_parameters())
    set_model_state_dict(other, sd)
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
    # loaded in place: the Parameter objects (held by optimizers) are the same ones
    assert all(params_before[k] is p for k, p in other.named_parameters())


@pytest.mark.parametrize("double_quant", [False, True])
def test_safetensors_save_file_of_the_state_dict_and_no_shared_storage(transformers, tmp_path, double_quant):
    from safetensors.torch import load_file, save_file

    model = nf4lib.convert(_llama(transformers), double_quant=double_quant)
    shared = {p: ks for p, ks in _storages(model).items() if len(ks) > 1}
    assert not shared, shared
    sd = model.state_dict()
    save_file(sd, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # bitsandbytes' lengths exactly: no padding stored behind a view
    for k, t in sd.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k


def test_each_layer_owns_its_8bit_map(transformers):
    model = nf4lib.convert(_llama(transformers), double_quant=True)
    layers = [m for m in model.modules() if isinstance(m, nf4lib.NF4Linear)]
    ids = torch.randint(0, 128, (1, 5))
    before = model(ids).logits
    with torch.no_grad():
        layers[0].weight.nested_quant_map.mul_(0.5)  # one layer's map
    assert torch.equal(layers[1].weight.nested_quant_map, nf4lib.dynamic_map())
    fresh = nf4lib.quantize(torch.randn(64, 64), double_quant=True)
    assert torch.equal(fresh.absmax.code, nf4lib.dynamic_map())
    assert not torch.equal(model(ids).logits, before)


def test_peft_counts_the_4bit_weights_as_bitsandbytes_does(transformers, peft):
    base = _llama(transformers)
    total = sum(p.numel() for p in base.parameters())
    model = nf4lib.convert(base)
    assert sum(p.numel() for p in model.parameters()) == total  # no weight lost to buffers
    assert model.num_parameters() == total
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, all_params = lora.get_nb_trainable_parameters()
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert trainable == adapters and all_params == total + adapters
    assert trainable / all_params < 0.05  # the ~1% a bitsandbytes base reports, not 11%


def test_init_weights_reinitialises_the_4bit_weights(transformers):
    model = nf4lib.convert(_llama(transformers))
    layer = model.model.layers[0].mlp.up_proj
    before = layer.weight.dequantize().clone()
    model.init_weights()  # normal_ on each Linear weight, as transformers does
    after = layer.weight.dequantize()
    assert isinstance(layer.weight, nf4lib.NF4Tensor) and not torch.equal(after, before)
    std = model.config.initializer_range
    assert abs(after.std().item() - std) < 0.2 * std
