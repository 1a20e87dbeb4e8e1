"""One QLoRA training step on CPU: forward + backward of a Llama-shaped bf16 model with PEFT
LoRA (r=16 on all 7 projections), timed round-robin in one run:

* dense bf16 base + LoRA;
* nf4lib base (``nf4lib.convert``, NF4, blocksize 64, bf16 compute) + LoRA;
* bitsandbytes 4-bit base (``BitsAndBytesConfig``, nf4, bf16 compute) + LoRA, when importable.

hidden 2048, 4 layers, intermediate 5504, vocab 32000, random weights; one sequence of 128
tokens. Target: nf4lib's step at least as fast as bitsandbytes'.

On a CPU without native bf16 matmul (AVX2 only) every bf16 GEMM of the step (LoRA, attention,
the bf16 head) takes PyTorch's slow reference path, so a step takes tens of seconds; there use
``--tokens 32 --rounds 1`` (about 5 minutes).

    python benchmarks/bench_qlora_step.py [--rounds 5] [--tokens 128]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import interleaved_ms, llama_bases, model_bench_args  # noqa: E402


_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    args = model_bench_args("QLoRA training step (forward + backward, LoRA r=16 on all 7 projections)", tokens=128)
    import peft

    bases = llama_bases()
    models = {}
    for name, base in bases.items():
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=_PROJ, lora_dropout=0.0)
        models[name] = peft.get_peft_model(base, lora).train()
    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    def step(m):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        m.zero_grad(set_to_none=True)

    ms = interleaved_ms({k: (lambda m=m: step(m)) for k, m in models.items()}, rounds=args.rounds, warmup=1)
    med = {k: median for k, (_, median) in ms.items()}
    print(f"{'base':<14}{'ms/step':>9}{'vs dense':>10}")
    for k, v in med.items():
        print(f"{k:<14}{v:>9.0f}{med['dense bf16'] / v:>9.2f}x")
    if "bitsandbytes" in med:
        ok = med["nf4lib"] <= med["bitsandbytes"]
        print(f"\ntargets:\n  [{'met' if ok else 'NOT met'}] nf4lib step >= bitsandbytes' speed: "
              f"{med['bitsandbytes'] / med['nf4lib']:.2f}x")


if __name__ == "__main__":
    main()
