"""Layer 5: one planner for module trees (convert) and bare checkpoints (the CLI) (core tier)."""

import pytest
import torch
from torch import nn

from nf4lib.transforms.plan import plan_checkpoint, plan_modules


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(16, 50, bias=False)


_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _header(model):
    return {k: (_ST[t.dtype], list(t.shape)) for k, t in model.state_dict().items()}


@pytest.mark.parametrize("exclude", [("lm_head",), ("lm_head", "*.mlp.*"), ("layers.1",), ("attn", "nothing_here"), ()])
def test_tree_and_checkpoint_plans_agree(exclude):
    model = _LM()
    tree = plan_modules(model, exclude)
    bare = plan_checkpoint(_header(model), exclude)
    assert {f"{name}.weight" for name, _ in tree.layers.values()} == set(bare.layers)
    assert tree.unmatched == bare.unmatched
    assert "embed_tokens.weight" not in bare.layers  # an embedding is not a linear weight


def test_checkpoint_plan_refuses_quantized_input_and_predicates():
    header = _header(_LM())
    with pytest.raises(ValueError, match="already quantized"):
        plan_checkpoint({**header, "lm_head.weight.quant_state.bitsandbytes__nf4": ("U8", [100])})
    with pytest.raises(TypeError, match="predicates"):
        plan_checkpoint(header, [lambda m, n: True])
