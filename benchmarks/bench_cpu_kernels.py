"""Native CPU kernels vs the pure-PyTorch path, bitsandbytes, torchao and dense F.linear.

One run prints everything side by side with ratios, then its targets:
dequantize and quantize throughput (Gelem/s and the fraction of this machine's
measured copy bandwidth), ``quantized_linear`` at batch 1, 4, 16, 256 on 4096x4096 and
on a Llama-7B MLP shape (11008x4096), bf16, NF4, blocksize 64, and the per-call time of
a small ``NF4Linear`` against ``nn.Linear``.

Targets (on every CPU, AVX2 or AVX512-BF16): dequantize >= bitsandbytes and >= 50% of the
copy-bandwidth limit; batch 1 >= 2x faster than dense bf16; batch 256 within 1.3x of dense
bf16 and >= bitsandbytes; per-call time <= 2x ``nn.Linear``'s, with and without gradients.
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
from nf4lib.backends.cpu.hugepages import empty_large
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
    # the kernel alone, into a buffer already touched: a fresh output's first-touch page
    # faults (the OS zeroing 32 MiB) cost more than the decode on some machines
    buf = torch.empty(n, dtype=torch.bfloat16).zero_()
    fns["native, into a buffer"] = lambda: _native.decode_into(buf, q)
    # the floor under any fresh output: allocate it as dequantize does and write it once
    fns["fresh output, fill only"] = lambda: empty_large(n, torch.bfloat16, "cpu").fill_(0)
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
    print(f"{'':<24}{'median ms':>10}{'Gelem/s':>9}{'of limit':>10}{'native is':>12}")
    for name, (_, med) in ms.items():
        rate = n / med / 1e6
        print(f"{name:<24}{med:>10.2f}{rate:>9.2f}{rate / limit:>10.0%}{ms[name][1] / ms['nf4lib native'][1]:>11.1f}x")
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


def per_call_section():
    """Per-call overhead: NF4Linear vs nn.Linear on a 256x256 layer at batch 1 (fp32), without
    and with gradients (a trainable bias; x requiring grad), round-robin."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 256)
    layer = nf4lib.NF4Linear.from_linear(dense)
    x, xg = torch.randn(1, 256), torch.randn(1, 256, requires_grad=True)

    def calls(fn, n=200):
        def run():
            for _ in range(n):
                fn()
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    fns = {
        "nf4 no-grad": no_grad(calls(lambda: layer(x))), "dense no-grad": no_grad(calls(lambda: dense(x))),
        "nf4 bias grad": calls(lambda: layer(x)), "dense bias grad": calls(lambda: dense(x)),
        "nf4 x grad": calls(lambda: layer(xg)), "dense x grad": calls(lambda: dense(xg)),
    }
    us = {k: v[1] * 1e3 / 200 for k, v in interleaved_ms(fns, rounds=9, warmup=1).items()}
    print("\nper call, NF4Linear vs nn.Linear, 256x256, batch 1, fp32 (median us a call)")
    for mode in ("no-grad", "bias grad", "x grad"):
        print(f"  {mode:<10} nf4lib {us['nf4 ' + mode]:7.1f}   dense {us['dense ' + mode]:7.1f}   "
              f"ratio {us['nf4 ' + mode] / us['dense ' + mode]:.2f}x")
    return us


def main():
    header("native CPU kernels")
    print(f"native library: {_native.available()}, instruction set {_native.isa()} (supported: {', '.join(_native.supported_isas())})")
    gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (torch copy_, 256 MiB fp32, read + write): {gbs:.1f} GB/s")
    deq, limit = dequantize_section(gbs)
    quant, cold = quantize_section()
    lin = linear_section(4096, 4096, (1, 4, 16, 256))
    mlp = linear_section(11008, 4096, (1, 4, 16, 256))
    calls = per_call_section()

    def check(ok, text):
        print(f"  [{'met' if ok else 'NOT met'}] {text}")

    print("\ntargets:")
    native = 16.8e6 / deq["nf4lib native"][1] / 1e6
    if "bitsandbytes" in deq:
        r = deq["bitsandbytes"][1] / deq["nf4lib native"][1]
        check(r >= 1, f"dequantize >= bitsandbytes: {r:.2f}x")
    allowed_ms = 16.8e6 / (0.5 * limit * 1e9) * 1e3
    check(native >= 0.5 * limit, f"dequantize >= 50% of the memory-bound limit: {native / limit:.0%} "
          f"(into a touched buffer: {16.8e6 / deq['native, into a buffer'][1] / 1e6 / limit:.0%}; filling a fresh "
          f"output alone takes {deq['fresh output, fill only'][1] / allowed_ms:.0%} of the time this target allows)")
    for name, res in (("4096x4096", lin), ("11008x4096", mlp)):
        d = res[1]["dense bf16"] / res[1]["native"]
        check(d >= 2, f"{name} batch 1 >= 2x faster than dense bf16 F.linear: {d:.2f}x")
        d = res[256]["native"] / res[256]["dense bf16"]
        check(d <= 1.3, f"{name} batch 256 within 1.3x of dense bf16: {d:.2f}x the time")
        if "bnb" in res[1]:
            for batch in (1, 256):
                b = res[batch]["bnb"] / res[batch]["native"]
                check(b >= 1, f"{name} batch {batch} >= bitsandbytes: {b:.2f}x")
        for batch in (16, 256):
            p = res[batch]["pure"] / res[batch]["native"]
            check(p >= 0.95, f"{name} batch {batch} at least as fast as the pure path (5% noise allowed): {p:.2f}x")
    for mode in ("no-grad", "bias grad", "x grad"):
        r = calls["nf4 " + mode] / calls["dense " + mode]
        check(r <= 2, f"NF4Linear per-call time <= 2x nn.Linear's ({mode}, 256x256): {r:.2f}x")
    if "bitsandbytes" in quant:
        r = quant["bitsandbytes"][1] / quant["nf4lib native"][1]
        check(r >= 10, f"quantize >= 10x bitsandbytes, no compile: {r:.1f}x")
    check(cold < 0.5, f"cold first quantize under 0.5 s: {cold:.3f} s")
    c = quant["pure compiled"][1] / quant["nf4lib native"][1]
    print(f"  compiled pure quantize vs native: native {c:.1f}x faster, so CPU quantize never compiles when the library is there")


if __name__ == "__main__":
    main()
