"""QLoRA in your own training loop: a frozen NF4 base and hand-written LoRA adapters.

No PEFT, no Trainer: this is what a trainer author writes when importing nf4lib.

    W x  ->  NF4(W) x + (alpha / r) * B A x        (Hu et al. 2021; Dettmers et al. 2023)

``A`` starts small and random, ``B`` at zero, so training starts from the quantized
model's own output; only ``A`` and ``B`` receive gradients, and the 4-bit base never
changes (``quantized_linear``'s backward computes dL/dx only).

Run: ``python examples/lora_training.py --steps 60``  (a tiny Llama on a toy task, CPU).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import nf4lib


class LoRALinear(nn.Module):
    """``base(x) + scaling * (x @ A.T) @ B.T`` around a frozen (NF4) linear layer."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.scaling = alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (self.scaling * delta).to(x.dtype)


def add_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every ``NF4Linear`` whose name ends in one of ``targets`` (in place); return the new parameters."""
    params = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nf4lib.NF4Linear) and child_name in targets:
                wrapped = LoRALinear(child, r, alpha)
                setattr(module, child_name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    return params


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = nf4lib.convert(tiny_llama(args.seed), double_quant=True)  # lm_head stays full precision
    for prm in model.parameters():
        prm.requires_grad_(False)  # freeze everything (embeddings, norms, head); LoRA adds the trainables
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), args.rank, 2.0 * args.rank)
    opt = torch.optim.AdamW(params, lr=args.lr)

    # Toy task: continue a fixed set of token sequences (the model must memorise them).
    g = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, 96, (8, 24), generator=g)
    losses = []
    for step in range(args.steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    # The 4-bit base is untouched: unwrap the adapters and compare bit for bit.
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    base_unchanged = all(torch.equal(base_state[k], after[k]) for k in base_state)
    print(f"trainable parameters: {sum(p.numel() for p in params)}; 4-bit base unchanged: {base_unchanged}")
    return {"losses": losses, "base_unchanged": base_unchanged, "trainable": sum(p.numel() for p in params)}


if __name__ == "__main__":
    main()
