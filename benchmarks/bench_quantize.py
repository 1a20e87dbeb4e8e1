"""Quantize / dequantize throughput and peak memory: nf4lib vs bitsandbytes vs torchao.

4096x4096 bf16 weight, blocksize 64, NF4. Run: ``python benchmarks/bench_quantize.py``.
Targets (issue 2): quantize >= 4x bitsandbytes, dequantize >= 1x bitsandbytes,
quantize's extra peak memory <= the input's size.
"""

import time

import torch

import nf4lib
from _util import best_ms, header, peak_extra_mib_isolated, torchao_nf4


def main():
    header("quantize / dequantize, 4096x4096 bf16, blocksize 64, nf4")
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    n = w.numel()
    input_mib = w.numel() * w.element_size() / 2**20

    start = time.perf_counter()
    q = nf4lib.quantize(w)  # first call compiles the fused kernel (one-off)
    cold = time.perf_counter() - start
    rows = []
    rows.append(("nf4lib", best_ms(lambda: nf4lib.quantize(w)), best_ms(lambda: nf4lib.dequantize(q)), peak_extra_mib_isolated("nf4lib")))

    try:
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
        rows.append((
            "bitsandbytes",
            best_ms(lambda: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4"), repeat=3),
            best_ms(lambda: bnb_f.dequantize_4bit(packed, state)),
            peak_extra_mib_isolated("bitsandbytes"),
        ))
    except ImportError:
        print("bitsandbytes not installed: skipped")
    ao = torchao_nf4()
    if ao is None:
        print("torchao not installed: skipped")
    else:
        to_nf4 = ao[0]
        t = to_nf4(w, block_size=64, scaler_block_size=256)
        rows.append((
            "torchao",
            best_ms(lambda: to_nf4(w, block_size=64, scaler_block_size=256), repeat=3),
            best_ms(lambda: t.get_original_weight(), repeat=3),
            peak_extra_mib_isolated("torchao"),
        ))

    base = {name: (qm, dm) for name, qm, dm, _ in rows}
    print(f"nf4lib cold first quantize (includes compiling the fused kernel): {cold:.1f} s")
    print(f"input size {input_mib:.0f} MiB (target: nf4lib's quantize peak extra memory <= this)")
    print(f"{'library':<14}{'quant ms':>10}{'Gelem/s':>9}{'dequant ms':>12}{'Gelem/s':>9}{'quant peak extra MiB':>22}")
    for name, qm, dm, mem in rows:
        mem_s = "n/a" if mem is None else f"{mem:.0f}"
        print(f"{name:<14}{qm:>10.1f}{n / qm / 1e6:>9.3f}{dm:>12.1f}{n / dm / 1e6:>9.3f}{mem_s:>22}")
    ours_q, ours_d = base["nf4lib"]
    for other in ("bitsandbytes", "torchao"):
        if other in base:
            oq, od = base[other]
            print(f"nf4lib vs {other}: quantize {oq / ours_q:.1f}x faster, dequantize {od / ours_d:.2f}x faster")


if __name__ == "__main__":
    main()
