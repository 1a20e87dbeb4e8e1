"""MSE-scaled quantize: its cost against absmax quantize, and what it buys.

    python benchmarks/bench_mse.py

4096x4096 weights (fp32 and bf16) drawn from N(0, 1), blocksize 64, NF4; timings are
medians of round-robin rounds (absmax, mse, absmax, mse, ...) so background load on a
shared machine falls on both alike. Target: mse at most 10x absmax quantize on CPU, and
at least 10% lower MSE. Also shown: the pure-PyTorch path (no native library, as on a
GPU or without a C compiler), on a 512-row slice, and importance weights' cost.
"""

import torch

import nf4lib
from nf4lib.backends.cpu import native as _native
from _util import header, interleaved_ms


def main():
    header("quantize(scale='mse') vs quantize(), 4096x4096, blocksize 64, nf4")
    torch.manual_seed(0)
    print(f"native library: {_native.available()} ({_native.isa()})")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(4096, 4096).to(dtype)
        imp = torch.rand(4096) + 0.5
        t = interleaved_ms({
            "absmax": lambda: nf4lib.quantize(w),
            "mse": lambda: nf4lib.quantize(w, scale="mse"),
            "mse+weights": lambda: nf4lib.quantize(w, scale="mse", importance=imp),
        }, rounds=7, warmup=1)
        err = {}
        for name, kw in (("absmax", {}), ("mse", {"scale": "mse"})):
            err[name] = float((nf4lib.dequantize(nf4lib.quantize(w, **kw), torch.float32) - w.float()).pow(2).mean())
        rows.append((dtype, t, err))
    slice_ = torch.randn(512, 4096)
    with _native.disabled():
        pure = interleaved_ms({"absmax": lambda: nf4lib.quantize(slice_), "mse": lambda: nf4lib.quantize(slice_, scale="mse")},
                              rounds=3, warmup=1)
    print(f"\n{'dtype':<10}{'absmax ms':>10}{'mse ms':>9}{'mse/absmax':>11}{'+weights ms':>12}{'MSE absmax':>12}{'MSE mse':>10}{'lower by':>9}")
    for dtype, t, err in rows:
        a, m, mw = t["absmax"][1], t["mse"][1], t["mse+weights"][1]
        print(f"{str(dtype)[6:]:<10}{a:>10.1f}{m:>9.1f}{m / a:>10.1f}x{mw:>12.1f}{err['absmax']:>12.5f}{err['mse']:>10.5f}"
              f"{1 - err['mse'] / err['absmax']:>9.1%}")
    print(f"pure-PyTorch path (512x4096 fp32): absmax {pure['absmax'][1]:.1f} ms, mse {pure['mse'][1]:.1f} ms "
          f"({pure['mse'][1] / pure['absmax'][1]:.1f}x)")
    worst = max(t["mse"][1] / t["absmax"][1] for _, t, _ in rows)
    gain = min(1 - e["mse"] / e["absmax"] for _, _, e in rows)
    print("\ntargets:")
    print(f"  [{'met' if worst <= 10 else 'MISSED'}] mse quantize at most 10x absmax on CPU: {worst:.1f}x")
    print(f"  [{'met' if gain >= 0.10 else 'MISSED'}] >= 10% lower MSE on N(0,1) at blocksize 64: {gain:.1%}")


if __name__ == "__main__":
    main()
