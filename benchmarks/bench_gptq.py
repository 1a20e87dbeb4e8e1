"""Time and peak memory of calibrating a Llama-shaped model of about 1B parameters with GPTQ-NF4.

Target: under 30 minutes on 2 CPU cores (random weights: the cost does not depend on them).

    python benchmarks/bench_gptq.py                      # ~1.1B: hidden 2048, 22 layers, intermediate 5632
    python benchmarks/bench_gptq.py --layers 2 --seqs 2   # a quick check

Calibration data: random token ids (the cost does not depend on them either),
sequences x tokens, the first block's inputs cached. Prints the time, the peak resident
memory, and the per-layer choices.
"""

import argparse
import resource
import time
from collections import Counter

import torch

import nf4lib
from nf4lib.gptq import calibrate


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seqs", type=int, default=16, help="calibration sequences (a quarter held out)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    a = p.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                                   num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 256),
                                   vocab_size=a.vocab, max_position_embeddings=max(2048, a.tokens))
    t0 = time.perf_counter()
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    batches = [{"input_ids": torch.randint(0, a.vocab, (1, a.tokens))} for _ in range(a.seqs)]
    print(f"nf4lib {nf4lib.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Llama-shaped model: {params / 1e9:.2f}B parameters ({a.layers} layers, hidden {a.hidden}, "
          f"intermediate {a.intermediate}), built in {built:.0f} s")
    print(f"calibration: {a.seqs} sequences x {a.tokens} tokens ({a.seqs - max(1, round(a.seqs / 4))} calibrate, "
          f"{max(1, round(a.seqs / 4))} held out)")
    t0 = time.perf_counter()
    qmodel, report = calibrate(model, batches, progress=True)
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    choices = Counter(r["choice"] for r in report)
    held = [r["heldout"][r["choice"]] for r in report]
    print(f"calibrated {len(report)} layers in {took / 60:.1f} min (target: under 30 min); peak resident memory "
          f"{peak:.1f} GiB (the fp32 model is {params * 4 / 2**30:.1f} GiB)")
    print(f"choices: {dict(choices)}; held-out output error of the chosen vs plain NF4: mean {sum(held) / len(held):.3f}x")


if __name__ == "__main__":
    main()
