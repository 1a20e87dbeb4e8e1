"""quantized_linear vs bitsandbytes matmul_4bit, torchao linear_nf4 and dense bf16 F.linear.

4096x4096 bf16 weight, NF4, blocksize 64, batch 1, 16 and 256. Run:
``python benchmarks/bench_linear.py``. On a CUDA machine it also times the GPU path.
Targets: >= bitsandbytes at every batch, >= 3x torchao at batch 1, within 3x of
dense bf16 at batch 1 (CPU); on an H100-class GPU, batch-1 >= 2.5x dense bf16.
"""

import torch
import torch.nn.functional as F

import nf4lib
from _util import best_ms, header, torchao_nf4


def run(device):
    header(f"quantized_linear, 4096x4096 bf16 weight, nf4, blocksize 64, device {device}")
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    q = nf4lib.quantize(w)
    impls = {"nf4lib": None, "bitsandbytes": None, "torchao": None, "dense bf16": None}
    wd = nf4lib.dequantize(q)
    impls["nf4lib"] = lambda x: nf4lib.quantized_linear(x, q)
    impls["dense bf16"] = lambda x: F.linear(x, wd)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
        impls["bitsandbytes"] = lambda x: bnb.matmul_4bit(x, packed.t(), state)
    except ImportError:
        pass
    ao = torchao_nf4()
    if ao is not None:
        to_nf4, linear_nf4 = ao
        t = to_nf4(w, block_size=64, scaler_block_size=256)
        impls["torchao"] = lambda x: linear_nf4(x, t)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"{'batch':>5}" + "".join(f"{k:>15}" for k in impls) + "   nf4lib speed-up vs: bnb / torchao / dense")
    for batch in (1, 16, 256):
        x = torch.randn(batch, 4096, dtype=torch.bfloat16, device=device)
        ms = {}
        for name, fn in impls.items():
            if fn is None:
                ms[name] = None
                continue
            repeat = 3 if batch == 256 or name == "torchao" else 7
            ms[name] = best_ms(lambda: (fn(x), sync()), repeat=repeat, warmup=1)
        ours = ms["nf4lib"]
        ratios = " / ".join("n/a" if ms[k] is None else f"{ms[k] / ours:.2f}x" for k in ("bitsandbytes", "torchao", "dense bf16"))
        print(f"{batch:>5}" + "".join(f"{'n/a' if v is None else f'{v:.2f} ms':>15}" for v in ms.values()) + f"   {ratios}")


if __name__ == "__main__":
    run("cpu")
    if torch.cuda.is_available():
        run("cuda")
