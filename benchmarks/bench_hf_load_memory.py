"""Peak memory of quantize-on-load (``from_pretrained(..., quantization_config=nf4lib.hf.NF4Config())``)
against ``from_pretrained(torch_dtype=bf16)`` then ``nf4lib.convert``.

    python benchmarks/bench_hf_load_memory.py [--dir /tmp/nf4lib_bench_llama_bf16]

Writes (once, cached) a random Llama of 12 layers, hidden 2048, in bf16: 1.16 GiB of
weights in 2 safetensors shards. Each way of loading runs in a fresh child process;
peak RSS is ``ru_maxrss``, reported above the RSS after imports. Target for
quantize-on-load: at most the 4-bit size + the largest single tensor + 300 MiB.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

WRITE = r'''
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                               num_key_value_heads=16, vocab_size=1024, tie_word_embeddings=False, torch_dtype="bfloat16")
with torch.device("meta"):
    m = transformers.LlamaForCausalLM(cfg)
m = m.to_empty(device="cpu").to(torch.bfloat16)
for p in m.parameters():
    torch.nn.init.normal_(p, std=0.02)
m.save_pretrained(sys.argv[1], max_shard_size="700MB")
'''

CHILD = r'''
import sys, json, resource, threading, time, torch, transformers
import nf4lib, nf4lib.hf
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
peak_anon = [0.0]
def sample():  # anonymous memory only: the loader memory-maps the files, whose pages count in RSS as cache
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
start = rss()
start_anon = status("RssAnon")
if sys.argv[2] == "nf4lib":
    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=nf4lib.hf.NF4Config(double_quant=True))
else:
    m = nf4lib.convert(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16), double_quant=True)
four = sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if ".weight" in k and (k.endswith(".weight") and t.dtype == torch.uint8 or ".absmax" in k or ".nested_absmax" in k))
time.sleep(0.05)
print(json.dumps({"start": start, "peak": rss(), "start_anon": start_anon, "peak_anon": peak_anon[0], "four_bit_mib": four / 2**20}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "nf4lib_bench_llama_bf16"))
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        subprocess.run([sys.executable, "-c", WRITE, args.dir], check=True)
    files = [f for f in os.listdir(args.dir) if f.endswith(".safetensors")]
    total = sum(os.path.getsize(os.path.join(args.dir, f)) for f in files)
    largest = 2048 * 5632 * 2 / 2**20  # gate/up/down_proj in bf16
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = {}
    for how in ("nf4lib", "baseline"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.dir, how], check=True, capture_output=True, text=True, env=env)
        res[how] = json.loads(out.stdout.strip().splitlines()[-1])
    four = res["nf4lib"]["four_bit_mib"]
    target = four + largest + 300
    print(f"checkpoint: Llama, 12 layers, hidden 2048, bf16: {total / 2**30:.2f} GiB in {len(files)} files; "
          f"4-bit linear weights {four:.0f} MiB (double-quantized); largest tensor {largest:.0f} MiB")
    print(f"{'MiB':<48}{'RSS start':>10}{'RSS peak':>10}{'anon start':>12}{'anon peak':>11}{'anon above':>12}")
    for how, label in (("nf4lib", "from_pretrained(quantization_config=NF4Config)"), ("baseline", "from_pretrained(bf16) + convert")):
        r = res[how]
        print(f"{label:<48}{r['start']:>10.0f}{r['peak']:>10.0f}{r['start_anon']:>12.0f}{r['peak_anon']:>11.0f}{r['peak_anon'] - r['start_anon']:>12.0f}")
    used = res["nf4lib"]["peak_anon"] - res["nf4lib"]["start_anon"]
    base = res["baseline"]["peak_anon"] - res["baseline"]["start_anon"]
    print("(RSS includes the memory-mapped checkpoint pages the loader touches, reclaimable page cache;")
    print(" 'anon' is the process's own memory, sampled every 5 ms)")
    print(f"quantize-on-load: {used:.0f} MiB of own memory above start vs {base:.0f} MiB ({base / used:.1f}x less); "
          f"target 4-bit + largest tensor + 300 MiB = {target:.0f} MiB: {'met' if used <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
