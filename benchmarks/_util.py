"""Shared timing and memory helpers for the benchmarks (not part of the library)."""

import os
import time

import torch


def best_ms(fn, repeat=7, warmup=2):
    """Best wall time of ``fn()`` in milliseconds (min over repeats: the least noisy estimate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def interleaved_ms(fns, rounds=15, warmup=2):
    """Time several callables round-robin: {name: (best ms, median ms)}.

    On a shared, noisy machine, timing one library after another lets drifting
    background load favour whichever ran in the quiet spell; alternating them each
    round gives every library the same conditions.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (min(t), sorted(t)[len(t) // 2]) for name, t in times.items()}


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn):
    """Peak resident memory above the starting point while ``fn()`` runs, in MiB (Linux).

    Writing 5 to /proc/self/clear_refs resets the kernel's peak-RSS counter (VmHWM).
    Returns None where that is not available.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        return (peak - before) / 1024
    except (OSError, KeyError):
        return None


def header(title):
    print(f"\n== {title} ==")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores")


def model_bench_args(title: str, tokens: int):
    """The whole-model benchmarks' command line (``--rounds``, ``--tokens``), after printing
    their header and the CPU's instruction sets and native ISA."""
    import argparse

    import nf4lib

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=tokens)
    args = ap.parse_args()
    header(title)
    print(f"CPU: {cpu_flags()}; native ISA: {nf4lib.backends.cpu.native.isa()}")
    return args


def torchao_nf4():
    """(to_nf4, linear_nf4) from whichever torchao layout is installed, or None."""
    for mod in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            m = __import__(mod, fromlist=["to_nf4", "linear_nf4"])
            return m.to_nf4, m.linear_nf4
        except ImportError:
            continue
    return None


def peak_extra_mib_isolated(lib):
    """peak_extra_mib of one quantize call by ``lib``, measured in a fresh child process."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, os.path.join(here, "_mem_probe.py"), lib], env=env, cwd=here,
        capture_output=True, text=True, check=False,
    )
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def cpu_flags() -> str:
    """The CPU's instruction sets that decide which kernels run (from /proc/cpuinfo)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of avx2/avx512"


def llama_bases():
    """``{name: model}``: one Llama-shaped bf16 model (hidden 2048, 4 layers, intermediate 5504,
    vocab 32000, random weights) as dense bf16, converted by nf4lib (NF4, blocksize 64, bf16
    compute) and, when bitsandbytes imports, loaded by transformers + bitsandbytes 4-bit."""
    import tempfile

    import transformers

    import nf4lib

    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                                   num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = {"dense bf16": dense, "nf4lib": nf4lib.convert(dense, compute_dtype=torch.bfloat16)}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes not importable: its column is skipped")
        return out
    with tempfile.TemporaryDirectory() as d:
        dense.save_pretrained(d)
        bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        out["bitsandbytes"] = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_cfg, dtype=torch.bfloat16)
    return out


def torchao_int4_model(dense):
    """``(model, None)``: a copy of ``dense`` with torchao's int4 weight-only linear layers
    (``Int4WeightOnlyConfig``, group 64, all 7 projections and not the head), or ``(None,
    reason)`` where torchao has no int4 weight-only path for this device (torchao 0.18's
    packing formats need CUDA, XPU or the mslk package; its CPU layout is gone)."""
    import copy

    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError as err:
        return None, f"torchao not importable ({err})"
    model = copy.deepcopy(dense)
    x = torch.randn(1, model.config.hidden_size, dtype=torch.bfloat16)
    errors = []
    for fmt in ("plain", "plain_int32", "tile_packed_to_4d", "preshuffled"):
        try:
            probe = torch.nn.Sequential(torch.nn.Linear(model.config.hidden_size, 256, bias=False)).bfloat16()
            quantize_(probe, Int4WeightOnlyConfig(group_size=64, int4_packing_format=fmt))
            with torch.no_grad():
                probe(x)
        except Exception as err:  # noqa: BLE001 - each format says why it cannot run here
            errors.append(f"{fmt}: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
            continue
        quantize_(model, Int4WeightOnlyConfig(group_size=64, int4_packing_format=fmt),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name)
        return model, None
    return None, "; ".join(errors)
