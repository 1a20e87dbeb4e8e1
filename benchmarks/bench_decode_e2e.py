"""End-to-end CPU decoding: transformers ``generate`` on a Llama-shaped model in bf16.

hidden 2048, 4 layers, intermediate 5504, vocab 32000, random weights; batch 1, greedy, 32 new
tokens. Settings, timed round-robin in one run (median tokens/s of the rounds):

* dense bf16;
* nf4lib (``nf4lib.convert``, NF4, blocksize 64, bf16 compute);
* bitsandbytes 4-bit (``BitsAndBytesConfig(load_in_4bit=True, nf4, bf16 compute)``, its CPU
  path as users get it, fast paths included), when importable;
* torchao int4 weight-only (``Int4WeightOnlyConfig``, group 64), where torchao has a path for
  this device (the run says why not otherwise).

Targets: nf4lib >= bitsandbytes' tokens/s and >= 2x dense bf16. The limit: a 4-bit weight is a
quarter of a bf16 one's bytes, so at the machine's copy bandwidth a token needs about
(4-bit bytes + the bf16 embedding/head) / bandwidth.

    python benchmarks/bench_decode_e2e.py [--rounds 5] [--tokens 32]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import interleaved_ms, llama_bases, model_bench_args, torchao_int4_model  # noqa: E402


def main():
    args = model_bench_args("end-to-end decode (transformers generate, batch 1, greedy)", tokens=32)
    models = {k: m.eval() for k, m in llama_bases().items()}
    ao, why = torchao_int4_model(models["dense bf16"])
    if ao is None:
        print(f"torchao int4 weight-only: not run on this CPU ({why})")
    else:
        models["torchao int4"] = ao.eval()
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))

    def generate(m):
        with torch.no_grad():  # exactly args.tokens new tokens (min_new_tokens)
            m.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    # warm-up round first (bitsandbytes repacks its weights on the first forward)
    ms = interleaved_ms({k: (lambda m=m: generate(m)) for k, m in models.items()}, rounds=args.rounds, warmup=1)
    med = {k: args.tokens / (median / 1e3) for k, (_, median) in ms.items()}
    print(f"{'setting':<14}{'tok/s':>8}{'vs dense':>10}")
    for k, v in med.items():
        print(f"{k:<14}{v:>8.1f}{v / med['dense bf16']:>9.2f}x")
    print("\ntargets:")
    ok = med["nf4lib"] >= 2 * med["dense bf16"]
    print(f"  [{'met' if ok else 'NOT met'}] nf4lib >= 2x dense bf16: {med['nf4lib'] / med['dense bf16']:.2f}x")
    if "bitsandbytes" in med:
        ok = med["nf4lib"] >= med["bitsandbytes"]
        print(f"  [{'met' if ok else 'NOT met'}] nf4lib >= bitsandbytes: {med['nf4lib'] / med['bitsandbytes']:.2f}x")


if __name__ == "__main__":
    main()
