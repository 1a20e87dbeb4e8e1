"""Quantize / dequantize throughput and peak memory: nf4lib vs bitsandbytes vs torchao.

4096x4096 bf16 weight, blocksize 64, NF4. Run: ``python benchmarks/bench_quantize.py``.
Targets: quantize >= 4x bitsandbytes, dequantize >= 1x bitsandbytes,
quantize's extra peak memory <= the input's size.

Dequantize timings are taken round-robin (each library once per round), so background
load on a shared machine falls on all of them alike; best and median are printed.
"""

import time

import torch

import nf4lib
from _util import best_ms, header, interleaved_ms, peak_extra_mib_isolated, torchao_nf4


def main():
    header("quantize / dequantize, 4096x4096 bf16, blocksize 64, nf4")
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    n = w.numel()
    input_mib = w.numel() * w.element_size() / 2**20

    start = time.perf_counter()
    q = nf4lib.quantize(w)  # first call compiles the fused kernel (one-off)
    cold = time.perf_counter() - start
    quant = {"nf4lib": best_ms(lambda: nf4lib.quantize(w))}
    dequant = {"nf4lib": lambda: nf4lib.dequantize(q)}
    memory = {"nf4lib": peak_extra_mib_isolated("nf4lib")}

    try:
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
        quant["bitsandbytes"] = best_ms(lambda: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4"), repeat=3)
        dequant["bitsandbytes"] = lambda: bnb_f.dequantize_4bit(packed, state)
        memory["bitsandbytes"] = peak_extra_mib_isolated("bitsandbytes")
    except ImportError:
        print("bitsandbytes not installed: skipped")
    ao = torchao_nf4()
    if ao is None:
        print("torchao not installed: skipped")
    else:
        to_nf4 = ao[0]
        t = to_nf4(w, block_size=64, scaler_block_size=256)
        quant["torchao"] = best_ms(lambda: to_nf4(w, block_size=64, scaler_block_size=256), repeat=3)
        dequant["torchao"] = lambda: t.get_original_weight()
        memory["torchao"] = peak_extra_mib_isolated("torchao")
    deq = interleaved_ms(dequant)

    print(f"nf4lib cold first quantize (includes compiling the fused kernel): {cold:.1f} s")
    print(f"input size {input_mib:.0f} MiB (target: nf4lib's quantize peak extra memory <= this)")
    print(
        f"{'library':<14}{'quant ms':>10}{'Gelem/s':>9}{'dequant ms':>12}{'Gelem/s':>9}"
        f"{'(median ms)':>13}{'quant peak extra MiB':>22}"
    )
    for name, qm in quant.items():
        dm, dmed = deq[name]
        mem = memory[name]
        mem_s = "n/a" if mem is None else f"{mem:.0f}"
        print(f"{name:<14}{qm:>10.1f}{n / qm / 1e6:>9.3f}{dm:>12.1f}{n / dm / 1e6:>9.3f}{dmed:>13.1f}{mem_s:>22}")
    for other in ("bitsandbytes", "torchao"):
        if other in quant:
            print(
                f"nf4lib vs {other}: quantize {quant[other] / quant['nf4lib']:.1f}x faster, "
                f"dequantize {deq[other][0] / deq['nf4lib'][0]:.2f}x faster "
                f"(medians: {deq[other][1] / deq['nf4lib'][1]:.2f}x)"
            )


if __name__ == "__main__":
    main()
