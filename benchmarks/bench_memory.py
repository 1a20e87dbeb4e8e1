"""Peak memory of `nf4lib.convert` and `nf4lib quantize`, against the obvious baselines.

    python benchmarks/bench_memory.py

Each measurement runs in a fresh child process (MALLOC_MMAP_THRESHOLD_ so freed buffers
go back to the OS) and reports the peak resident memory above the point just before the
call (VmHWM after resetting it through /proc/self/clear_refs; Linux only).

- convert: a stack of fp32 Linear(2048, 2048) layers. Target: extra peak about the 4-bit
  copy plus one layer. Baseline: ``copy.deepcopy`` then quantize in place (what keeping
  the input intact costs without layer-by-layer conversion).
- quantize (CLI): safetensors checkpoints of two sizes. Target: extra peak flat in the
  checkpoint size. Baseline: ``safetensors.torch.load_file`` + quantize + ``save_file``.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CHILD = r'''
import copy, sys, torch
sys.path.insert(0, {here!r})
from _util import peak_extra_mib
import nf4lib
from torch import nn
kind, arg = sys.argv[1], sys.argv[2:]
nf4lib.quantize(torch.randn(2048, 2048))  # warm the fused kernel: its one-off memory is not the call's
if kind in ("convert", "deepcopy"):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(int(arg[0]))])
    if kind == "convert":
        fn = lambda: nf4lib.convert(model, progress=False)
    else:
        def fn():
            m = copy.deepcopy(model)
            for i, lin in enumerate(m):
                m[i] = nf4lib.NF4Linear.from_linear(lin)
            return m
else:
    src, dst = arg
    if kind == "cli":
        from nf4lib.tools.cli import main
        fn = lambda: main(["quantize", src, dst, "--no-progress"])
    else:
        from safetensors.torch import load_file, save_file
        def fn():
            sd = load_file(src)
            out = {{}}
            for k, v in sd.items():
                out.update(nf4lib.to_bnb(nf4lib.quantize(v), k) if v.dim() == 2 else {{k: v}})
            save_file({{k: v.contiguous() for k, v in out.items()}}, dst)
print(peak_extra_mib(fn))
'''


def measure(*args):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", CHILD.format(here=HERE), *map(str, args)],
                         env=env, capture_output=True, text=True, check=False)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.stderr.write(out.stderr[-2000:])
        return float("nan")


def main():
    import torch
    from safetensors.torch import save_file

    from _util import header

    header("memory: convert and the quantize command")
    layer_mib = 2048 * 2048 * 4 / 2**20
    print(f"\nconvert (fp32 Linear(2048, 2048) layers, {layer_mib:.0f} MiB each; 4-bit copy = 4.5/32 of the model)")
    print(f"{'layers':>6} {'model MiB':>10} {'4-bit MiB':>10} {'nf4lib extra':>13} {'deepcopy extra':>15} {'ratio':>7}")
    for n in (8, 24):
        ours, base = measure("convert", n), measure("deepcopy", n)
        print(f"{n:>6} {n * layer_mib:>10.0f} {n * layer_mib * 4.5 / 32:>10.1f} {ours:>13.1f} {base:>15.1f} {base / ours:>6.1f}x")

    print("\nnf4lib quantize IN OUT (safetensors, fp32 2048x2048 tensors)")
    print(f"{'tensors':>7} {'file MiB':>9} {'nf4lib extra':>13} {'load_file+save_file extra':>26} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as d:
        for n in (8, 24):
            src = os.path.join(d, f"in{n}.safetensors")
            torch.manual_seed(0)
            save_file({f"layers.{i}.weight": torch.randn(2048, 2048) for i in range(n)}, src)
            mib = os.path.getsize(src) / 2**20
            ours = measure("cli", src, os.path.join(d, "a.safetensors"))
            base = measure("naive", src, os.path.join(d, "b.safetensors"))
            print(f"{n:>7} {mib:>9.0f} {ours:>13.1f} {base:>26.1f} {base / ours:>6.1f}x")


if __name__ == "__main__":
    main()
