"""Peak memory per rank of the FSDP2 QLoRA low-memory start, against loading the model whole.

    python benchmarks/bench_fsdp_memory.py [--nproc 2] [--dir /tmp/nf4lib_1b]

1. Writes (once, cached in ``--dir``) a random Llama of 6 layers, hidden 2048: 1.16 GiB
   of fp32 weights, in a child process.
2. Runs ``examples/fsdp_qlora.py --size 1b --checkpoint DIR --double-quant --steps 2``
   under torchrun: every rank builds on meta, rank 0 reads and quantizes one tensor at a
   time, each rank keeps its shards, then two training steps.
3. Baseline, in a child process: what a single process does without it:
   ``from_pretrained`` the fp32 model, ``nf4lib.convert``, peft LoRA.

Peak RSS is ``ru_maxrss`` (the process's high-water mark). Target per rank: at most the
framework's own footprint (RSS after imports and process-group start) + the whole
model's 4-bit size + one decoder layer in fp32.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30

WRITE = r'''
import sys, importlib.util
spec = importlib.util.spec_from_file_location("ex", sys.argv[1]); ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
ex.write_base_checkpoint(ex.llama_config("1b"), sys.argv[2])
'''

BASELINE = r'''
import sys, resource, importlib.util, torch, transformers, peft
spec = importlib.util.spec_from_file_location("ex", sys.argv[1]); ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)
import nf4lib
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[2], torch_dtype=torch.float32)
model = nf4lib.convert(model, double_quant=True)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=ex.TARGETS))
print(start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "nf4lib_bench_llama_1b"))
    args = ap.parse_args()
    example = os.path.join(ROOT, "examples", "fsdp_qlora.py")
    if not os.path.exists(os.path.join(args.dir, "model.safetensors")):
        subprocess.run([sys.executable, "-c", WRITE, example, args.dir], check=True)
    fp32_bytes = os.path.getsize(os.path.join(args.dir, "model.safetensors"))

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), example,
               "--size", "1b", "--checkpoint", args.dir, "--double-quant", "--steps", "2", "--no-resume", "--out", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        with open(os.path.join(out, "result.json")) as f:
            res = json.load(f)
    base = subprocess.run([sys.executable, "-c", BASELINE, example, args.dir], check=True, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    base_start, base_peak = map(float, base.stdout.split()[-2:])

    mib = 1 << 20
    size = {"h": 2048, "i": 5632}  # examples/fsdp_qlora.py SIZES["1b"] (16 heads = 16 kv heads)
    layer_fp32 = (4 * size["h"] * size["h"] + 3 * size["h"] * size["i"] + 2 * size["h"]) * 4 / mib
    four_bit = res["nf4_bytes_full"] / mib
    print(f"model: Llama, 6 layers, hidden 2048: {fp32_bytes / GIB:.2f} GiB fp32 checkpoint; "
          f"4-bit weights {four_bit:.0f} MiB (double-quantized), one decoder layer {layer_fp32:.0f} MiB fp32")
    print(f"{'':<26}{'start (framework)':>18}{'peak after load':>17}{'peak after 2 steps':>20}{'4-bit held':>12}{'target':>9}")
    ok = True
    for r, pr in enumerate(res["per_rank"]):
        target = pr["rss_at_start_mib"] + four_bit + layer_fp32
        ok &= pr["peak_rss_after_load_mib"] <= target
        print(f"{'FSDP2 rank ' + str(r) + ' (MiB)':<26}{pr['rss_at_start_mib']:>18.0f}{pr['peak_rss_after_load_mib']:>17.0f}"
              f"{pr['peak_rss_after_train_mib']:>20.0f}{pr['nf4_bytes_local'] / mib:>12.0f}{target:>9.0f}")
    print(f"{'1 process, from_pretrained':<26}{base_start:>18.0f}{base_peak:>17.0f}{'':>20}{four_bit:>12.0f}")
    worst = max(pr["peak_rss_after_load_mib"] - pr["rss_at_start_mib"] for pr in res["per_rank"])
    print(f"peak above start: worst rank {worst:.0f} MiB vs {base_peak - base_start:.0f} MiB loading whole "
          f"({(base_peak - base_start) / worst:.1f}x less); target (4-bit + one layer) {four_bit + layer_fp32:.0f} MiB: "
          f"{'met' if ok else 'MISSED'}")
    print(f"load {res['load_s']:.1f} s, 2 training steps {res['train_s']:.1f} s")


if __name__ == "__main__":
    main()
