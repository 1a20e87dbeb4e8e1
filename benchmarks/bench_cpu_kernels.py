"""Native CPU kernels vs the pure-PyTorch path, bitsandbytes, torchao and dense F.linear.

One run prints everything side by side with ratios, then its targets:
dequantize and quantize throughput (Gelem/s and the fraction of this machine's
measured copy bandwidth), ``quantized_linear`` at batch 1, 4, 16, 256 on 4096x4096 and
on a Llama-7B MLP shape (11008x4096), bf16, NF4, blocksize 64.
Timings are medians of rounds in which every library runs once (round-robin), so
drifting background load on a shared machine falls on all of them alike.

Run: ``python benchmarks/bench_cpu_kernels.py`` (about 5 minutes on 2 cores, most of
it in the slow baselines and the pure path's one-off torch.compile).
"""

import os
import time

import torch
import torch.nn.functional as F

import nf4lib
from nf4lib.backends.cpu import native as _native
from _util import header, interleaved_ms, torchao_nf4

BYTES_PER_ELEM = 0.5 + 4 / 64 + 2  # packed codes + float32 absmax per 64 + the bf16 output


def copy_bandwidth_gbs():
    """Copy bandwidth (bytes read + written per second) of torch's copy_ on 256 MiB."""
    src = torch.ones(64 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = interleaved_ms({"copy": lambda: dst.copy_(src)}, rounds=9)["copy"][1]
    return 2 * src.numel() * 4 / (t / 1e3) / 1e9


def pure(fn):
    def run():
        with _native.disabled():
            return fn()

    return run


def bnb_functions():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f

        return bnb, bnb_f
    except ImportError:
        return None, None


def dequantize_section(gbs):
    n = 4096 * 4096
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    q = nf4lib.quantize(w)
    fns = {"nf4lib native": lambda: nf4lib.dequantize(q), "nf4lib pure": pure(lambda: nf4lib.dequantize(q))}
    bnb, bnb_f = bnb_functions()
    if bnb_f is not None:
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
        fns["bitsandbytes"] = lambda: bnb_f.dequantize_4bit(packed, state)
    ao = torchao_nf4()
    if ao is not None:
        t = ao[0](w, block_size=64, scaler_block_size=256)
        fns["torchao"] = t.get_original_weight
    ms = interleaved_ms(fns, rounds=15)
    limit = gbs * 1e9 / BYTES_PER_ELEM / 1e9
    print(f"\ndequantize 4096x4096 -> bf16 (memory-bound limit here: {gbs:.1f} GB/s / {BYTES_PER_ELEM:.2f} B/elem = {limit:.1f} Gelem/s)")
    print(f"{'':<16}{'median ms':>10}{'Gelem/s':>9}{'of limit':>10}{'native is':>12}")
    for name, (_, med) in ms.items():
        rate = n / med / 1e6
        print(f"{name:<16}{med:>10.2f}{rate:>9.2f}{rate / limit:>10.0%}{ms[name][1] / ms['nf4lib native'][1]:>11.1f}x")
    return ms, limit


def quantize_section():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    start = time.perf_counter()
    nf4lib.quantize(w)
    cold = time.perf_counter() - start
    fns = {"nf4lib native": lambda: nf4lib.quantize(w)}

    def eager():
        os.environ["NF4LIB_COMPILE"] = "0"
        try:
            with _native.disabled():
                return nf4lib.quantize(w)
        finally:
            del os.environ["NF4LIB_COMPILE"]

    fns["pure eager"] = eager
    start = time.perf_counter()
    pure(lambda: nf4lib.quantize(w))()  # compiles the fused kernel (one-off)
    compile_s = time.perf_counter() - start
    fns["pure compiled"] = pure(lambda: nf4lib.quantize(w))
    bnb, bnb_f = bnb_functions()
    if bnb_f is not None:
        fns["bitsandbytes"] = lambda: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ms = interleaved_ms(fns, rounds=5, warmup=1)
    print(f"\nquantize 4096x4096 bf16: native cold first call {cold:.3f} s (pure path's first call, compiling: {compile_s:.1f} s)")
    print(f"{'':<16}{'median ms':>10}{'Gelem/s':>9}{'native is':>12}")
    for name, (_, med) in ms.items():
        print(f"{name:<16}{med:>10.1f}{w.numel() / med / 1e6:>9.3f}{med / ms['nf4lib native'][1]:>11.1f}x")
    return ms, cold


def linear_section(out_f, in_f, batches):
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    q = nf4lib.quantize(w)
    wd = nf4lib.dequantize(q)
    wf = wd.float()
    bnb, bnb_f = bnb_functions()
    ao = torchao_nf4()
    if bnb_f is not None:
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    if ao is not None:
        t = ao[0](w, block_size=64, scaler_block_size=256)
    print(f"\nquantized_linear, weight {out_f}x{in_f} bf16 (median ms; ratio = other / native, >1: native faster)")
    cols = ["native", "pure", "bnb", "torchao", "dense bf16", "dense fp32"]
    print(f"{'batch':>5}" + "".join(f"{c:>12}" for c in cols) + "   vs: pure / bnb / torchao / dense bf16 / dense fp32")
    out = {}
    for batch in batches:
        x = torch.randn(batch, in_f, dtype=torch.bfloat16)
        xf = x.float()
        fns = {"native": lambda: nf4lib.quantized_linear(x, q), "pure": pure(lambda: nf4lib.quantized_linear(x, q))}
        if bnb_f is not None:
            fns["bnb"] = lambda: bnb.matmul_4bit(x, packed.t(), state)
        if ao is not None:
            fns["torchao"] = lambda: ao[1](x, t)
        fns["dense bf16"] = lambda: F.linear(x, wd)
        fns["dense fp32"] = lambda: F.linear(xf, wf)
        rounds = 5 if batch >= 256 else 9
        ms = {k: v[1] for k, v in interleaved_ms(fns, rounds=rounds, warmup=1).items()}
        ratios = " / ".join(f"{ms[c] / ms['native']:.2f}x" if c in ms else "n/a" for c in cols[1:])
        print(f"{batch:>5}" + "".join(f"{ms[c]:>12.2f}" if c in ms else f"{'n/a':>12}" for c in cols) + f"   {ratios}")
        out[batch] = ms
    return out


def main():
    header("native CPU kernels")
    print(f"native library: {_native.available()}, instruction set {_native.isa()} (supported: {', '.join(_native.supported_isas())})")
    gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (torch copy_, 256 MiB fp32, read + write): {gbs:.1f} GB/s")
    deq, limit = dequantize_section(gbs)
    quant, cold = quantize_section()
    lin = linear_section(4096, 4096, (1, 4, 16, 256))
    mlp = linear_section(11008, 4096, (1, 4, 16, 256))

    def check(ok, text):
        print(f"  [{'met' if ok else 'NOT met'}] {text}")

    print("\ntargets:")
    native = 16.8e6 / deq["nf4lib native"][1] / 1e6
    if "bitsandbytes" in deq:
        r = deq["bitsandbytes"][1] / deq["nf4lib native"][1]
        check(r >= 4, f"dequantize >= 4x bitsandbytes: {r:.1f}x")
    check(native >= 0.25 * limit, f"dequantize >= 25% of the memory-bound limit: {native / limit:.0%}")
    for name, res in (("4096x4096", lin), ("11008x4096", mlp)):
        d = res[1]["dense bf16"] / res[1]["native"]
        check(d > 1, f"{name} batch 1 faster than dense bf16 F.linear (aim 2x): {d:.2f}x")
        if "bnb" in res[1]:
            b = res[1]["bnb"] / res[1]["native"]
            check(b >= 8, f"{name} batch 1 >= 8x bitsandbytes: {b:.1f}x")
        for batch in (16, 256):
            p = res[batch]["pure"] / res[batch]["native"]
            check(p >= 0.95, f"{name} batch {batch} at least as fast as the pure path (5% noise allowed): {p:.2f}x")
    if "bitsandbytes" in quant:
        r = quant["bitsandbytes"][1] / quant["nf4lib native"][1]
        check(r >= 10, f"quantize >= 10x bitsandbytes, no compile: {r:.1f}x")
    check(cold < 0.5, f"cold first quantize under 0.5 s: {cold:.3f} s")
    c = quant["pure compiled"][1] / quant["nf4lib native"][1]
    print(f"  compiled pure quantize vs native: native {c:.1f}x faster, so CPU quantize never compiles when the library is there")


if __name__ == "__main__":
    main()
