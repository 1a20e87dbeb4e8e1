"""GPU benchmark: NF4 matmuls, dequantize and a QLoRA decoder layer on CUDA.

    python benchmarks/bench_gpu.py            # everything, ~3-5 minutes on an H100
    python benchmarks/bench_gpu.py --quick    # the 4096x4096 shapes only

Needs only torch and Triton; bitsandbytes and torchao are extra columns when importable.
Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs, so the weight
comes from HBM as in a real decode step). Shapes are (in_features -> out_features), bf16.
Ratios are other / nf4lib: above 1, nf4lib is faster.
"""

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

import nf4lib

SHAPES = [(4096, 4096), (4096, 11008), (8192, 28672)]
BATCHES = [1, 4, 16, 64, 512, 4096]
IDEAL = 16 / 4.5  # bf16 bits over NF4 bits (4 + 32/64) at blocksize 64


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def copy_bandwidth(dev) -> float:
    """Device copy bandwidth, GB/s (read + write) of a 1 GiB copy_."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def linear_table(k, n, dev, bnb, torchao_nf4, batches):
    w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) / math.sqrt(k)
    q = nf4lib.quantize(w)
    if bnb is not None:
        import bitsandbytes.functional as bf

        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    if torchao_nf4 is not None:
        to_nf4, linear_nf4 = torchao_nf4
        ao_w = to_nf4(w, 64, 256)
    print(f"\nquantized_linear {k} -> {n} bf16 (median ms; ratio = other / nf4lib)")
    head = f"{'batch':>6} {'nf4lib':>9} {'dense':>9}" + (f" {'bnb':>9}" if bnb else "") + (f" {'torchao':>9}" if torchao_nf4 else "")
    print(head + "   dense/nf4lib" + ("  bnb/nf4lib" if bnb else "") + ("  torchao/nf4lib" if torchao_nf4 else ""))
    rows = {}
    for m in batches:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        t = {"nf4lib": bench(lambda: nf4lib.quantized_linear(x, q)), "dense": bench(lambda: F.linear(x, w))}
        if bnb is not None:
            t["bnb"] = bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
        if torchao_nf4 is not None:
            t["torchao"] = bench(lambda: linear_nf4(x, ao_w))
        rows[m] = t
        line = f"{m:>6} " + " ".join(f"{v:>9.4f}" for v in t.values())
        line += "   " + "  ".join(f"{t[c] / t['nf4lib']:>10.2f}x" for c in t if c != "nf4lib")
        print(line)
    return rows


def dequant_table(dev, bandwidth):
    print(f"\ndequantize (bytes read + written per second; device copy bandwidth {bandwidth:.0f} GB/s)")
    print(f"{'shape':>14} {'dtype':>9} {'double':>6} {'ms':>8} {'GB/s':>7} {'of copy':>8}")
    fractions = []
    for n, k in ((4096, 4096), (28672, 8192)):
        for dtype in (torch.bfloat16, torch.float32):
            for dq in (False, True):
                q = nf4lib.quantize(torch.randn(n, k, device=dev), double_quant=dq)
                ms = bench(lambda: nf4lib.dequantize(q, dtype))
                moved = q.packed.numel() + q.scales.stored_bits / 8 + n * k * dtype.itemsize
                gbs = moved / ms / 1e6
                fractions.append(gbs / bandwidth)
                print(f"{f'{n}x{k}':>14} {str(dtype)[6:]:>9} {str(dq):>6} {ms:>8.3f} {gbs:>7.0f} {gbs / bandwidth:>7.0%}")
    return min(fractions)


class DecoderLayer(nn.Module):
    """A Llama-style block: RMSNorm, attention (q, k, v, o), RMSNorm, SwiGLU MLP."""

    def __init__(self, hidden=4096, inter=11008, heads=32):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.n1, self.n2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)

    def forward(self, x):
        b, s, h = x.shape
        y = self.n1(x)
        q, k, v = (p(y).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.o(a)
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class LoRA(nn.Module):
    def __init__(self, base, dev, r=16):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features, device=dev, dtype=torch.bfloat16) / base.in_features**0.5)
        self.b = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.bfloat16))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T


def with_lora(layer, dev):
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        setattr(layer, name, LoRA(getattr(layer, name), dev))
    for p in layer.parameters():
        p.requires_grad_(False)  # frozen base (norms too); only the adapters train
    for m in layer.modules():
        if isinstance(m, LoRA):
            m.a.requires_grad_(True)
            m.b.requires_grad_(True)
    return layer


def qlora_layer(dev, bnb, hidden=4096, inter=11008, tokens=512):
    print(f"\nQLoRA decoder layer (hidden {hidden}, MLP {inter}, LoRA r=16 on all 7 projections), batch 4 x {tokens} tokens, bf16")
    torch.manual_seed(0)
    base = DecoderLayer(hidden, inter).to(dev, torch.bfloat16)
    variants = {"dense bf16": with_lora(base, dev), "nf4lib": with_lora(nf4lib.convert(DecoderLayer(hidden, inter).to(dev, torch.bfloat16)), dev)}
    if bnb is not None:
        ref = DecoderLayer(hidden, inter).to(dev, torch.bfloat16)
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            lin = getattr(ref, name)
            q4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            q4.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            setattr(ref, name, q4.to(dev))
        variants["bnb"] = with_lora(ref, dev)
    x = torch.randn(4, tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    times = {}
    for name, layer in variants.items():
        def step():
            layer(x).float().pow(2).mean().backward()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times[name] = bench(step)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        print(f"  {name:>10}: forward+backward {times[name]:8.2f} ms, peak {peak:5.2f} GiB")
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the 4096x4096 shapes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure (the kernels are tested on CPU "
              "under TRITON_INTERPRET=1, see tests/test_triton.py)")
        return 1
    if optional("triton") is None:
        print("bench_gpu: Triton is not installed; nf4lib would use its PyTorch fallback")
        return 1
    dev = torch.device("cuda")
    from _util import torchao_nf4

    bnb, ao = optional("bitsandbytes"), torchao_nf4()
    print(f"== nf4lib on {torch.cuda.get_device_name()} ==  torch {torch.__version__}, triton {sys.modules['triton'].__version__}, "
          f"bitsandbytes {getattr(bnb, '__version__', 'absent')}, torchao {'present' if ao else 'absent'}")
    bandwidth = copy_bandwidth(dev)
    results = {}
    for k, n in SHAPES[:1] if args.quick else SHAPES:
        results[(k, n)] = linear_table(k, n, dev, bnb, ao, BATCHES)
    worst_dequant = dequant_table(dev, bandwidth)
    layer = qlora_layer(dev, bnb)

    def speedup(shape, m):
        r = results.get(shape, {}).get(m)
        return r["dense"] / r["nf4lib"] if r else float("nan")

    print("\ntargets:")
    checks = []
    for shape in ((4096, 4096), (8192, 28672)):
        if shape in results:
            s = speedup(shape, 1)
            checks.append((f"{shape[0]}x{shape[1]} batch 1 >= 2.5x dense bf16 (ideal {IDEAL:.2f}x)", s >= 2.5, f"{s:.2f}x"))
            if bnb is not None:
                b = results[shape][1]["bnb"] / results[shape][1]["nf4lib"]
                checks.append((f"{shape[0]}x{shape[1]} batch 1 faster than bitsandbytes", b > 1, f"{b:.2f}x"))
            s16 = speedup(shape, 16)
            checks.append((f"{shape[0]}x{shape[1]} batch 16 >= 1.5x dense", s16 >= 1.5, f"{s16:.2f}x"))
            for m in (512, 4096):
                s = speedup(shape, m)
                checks.append((f"{shape[0]}x{shape[1]} batch {m} within 1.3x of dense", s >= 1 / 1.3, f"{1 / s:.2f}x dense's time"))
    checks.append(("dequantize >= 70% of copy bandwidth (worst case)", worst_dequant >= 0.7, f"{worst_dequant:.0%}"))
    checks.append(("QLoRA layer forward+backward vs dense bf16 LoRA", True, f"{layer['nf4lib'] / layer['dense bf16']:.2f}x dense's time"))
    for text, ok, value in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {text}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
