"""The Triton kernels (CUDA / XPU) against the CPU reference.

* ``triton`` tier: the kernels under the Triton interpreter (``TRITON_INTERPRET=1``, CPU
  tensors, numpy underneath), in a subprocess since the interpreter is chosen when a
  kernel is first launched; small shapes, as CI runs them.
* ``cuda`` tests: the same checks on a real GPU, plus opcheck and a fullgraph compile;
  they run wherever ``torch.cuda.is_available()`` (skipped here, reported as skipped).

What must hold: quantize's bytes and absmax equal the CPU's; dequantize's values equal
the CPU's bit for bit in every dtype; the matmuls agree with the CPU kernel to float32
summation-order rounding (fp32) or exactly up to the output rounding (bf16 / fp16 sums
of exactly rounded weights, in float32, in another order: at most a few output ulps).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import nf4lib

_SCRIPT = r"""
import json, torch, nf4lib
from nf4lib.core.codebooks import named_thresholds, named_to_storage
from nf4lib.backends.cpu import kernels as cpu
from nf4lib.backends.triton import kernels as tk
assert tk.HAVE_TRITON and tk.interpreting()
torch.manual_seed(0)
out = {"dequant": [], "quant": [], "linear": [], "route": [], "nan": None}
cases = [(72, 256, 64, False, "nf4"), (40, 512, 128, True, "fp4"), (33, 128, 32, True, "int4"), (5, 4096, 4096, True, "nf4")]
for n_out, k, bs, dq, code in cases:
    q = nf4lib.quantize(torch.randn(n_out, k), blocksize=bs, double_quant=dq, code=code)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        d, r = tk.dequantize(q, dt), nf4lib.dequantize(q, dt)
        out["dequant"].append([n_out, k, str(dt), d.shape == r.shape and d.dtype == r.dtype and torch.equal(d, r)])
        for m, split in ((1, 1), (2, 1), (3, 2), (5, 1), (16, 1), (16, 4)):
            x = torch.randn(m, k).to(dt)
            b = torch.randn(n_out).to(dt)
            y, ref = tk.fused_linear(x, q, b, split=split), cpu.linear(x, q, b)
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            out["linear"].append([n_out, k, str(dt), m, split, err, y.dtype == dt and y.shape == ref.shape])
# dequantize of odd sizes, partial last blocks and partial double-quant groups
for numel, bs in ((1, 64), (63, 64), (1001, 64), (64 * 300 + 7, 64), (5000, 2048), (70000, 65536)):
    q = nf4lib.quantize(torch.randn(numel) * 3, blocksize=bs, double_quant=numel > 100)
    for dt in (torch.float32, torch.bfloat16):
        out["dequant"].append([numel, bs, str(dt), torch.equal(tk.dequantize(q, dt), nf4lib.dequantize(q, dt))])
# quantize: bytes and absmax equal, tails included; FP4 uses the storage map
for numel, bs, code in ((64 * 40, 64, "nf4"), (1000, 64, "fp4"), (4096 + 33, 256, "int4"), (300, 4096, "nf4"), (7, 16, "nf4")):
    x = torch.randn(numel) * torch.rand(numel) * 5
    x[::97] = 0.0
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-numel // bs))
    storage = named_to_storage(code) if code == "fp4" else None
    ok = tk.quantize_into(x, bs, named_thresholds(code), storage, packed, absmax)
    ref = nf4lib.quantize(x, blocksize=bs, code=code)
    out["quant"].append([numel, bs, code, ok, torch.equal(packed, ref.packed), torch.equal(absmax, ref.absmax)])
# a blocksize too large for one kernel row is declined (PyTorch then does it)
out["declined"] = not tk.quantize_into(torch.randn(8192), 8192, named_thresholds("nf4"), None,
                                        torch.empty(4096, dtype=torch.uint8), torch.empty(1))
# NaN / Inf make that block's absmax non-finite, which quantize reports
x = torch.randn(256); x[70] = float("nan"); x[200] = float("inf")
am = torch.empty(4)
tk.quantize_into(x, 64, named_thresholds("nf4"), None, torch.empty(128, dtype=torch.uint8), am)
out["nan"] = [bool(torch.isfinite(a)) for a in am]
# routing: skinny x fused; more rows, or blocks straddling rows, through dequantize + matmul
q = nf4lib.quantize(torch.randn(24, 96), blocksize=64)
x = torch.randn(40, 96)
out["route"].append(((tk.linear(x, q, None) - cpu.linear(x, q, None)).abs().max() / cpu.linear(x, q, None).abs().max()).item())
x = torch.randn(3, 96)
out["route"].append(((tk.linear(x, q, None) - cpu.linear(x, q, None)).abs().max() / cpu.linear(x, q, None).abs().max()).item())
out["gemv_ok"] = [tk.gemv_ok(q), tk.gemv_ok(nf4lib.quantize(torch.randn(24, 128)))]
# the public functions reach the kernels through the ops, registered as on CUDA / XPU
x = torch.randn(100, 64 * 5 + 3)
before = nf4lib.quantize(x, double_quant=True)
w_before = nf4lib.dequantize(before, torch.bfloat16)
from nf4lib.ops.library import register_kernel
calls = []
register_kernel("quantize", "cpu")(lambda *a: calls.append("q") or tk.quantize(*a))
register_kernel("dequantize", "cpu")(lambda q, dt: calls.append("d") or tk.dequantize_or_default(q, dt))
after = nf4lib.quantize(x, double_quant=True)
out["hook"] = [calls, torch.equal(after.packed, before.packed), torch.equal(after.absmax.codes, before.absmax.codes),
               torch.equal(nf4lib.dequantize(after, torch.bfloat16), w_before)]
print(json.dumps(out))
"""


def _tolerance(dtype: str) -> float:
    # fp32: summation order over K <= 4096 terms; bf16/fp16: the output's own rounding
    # (2^-8 / 2^-11 relative) plus order, relative to the largest output
    return {"torch.float32": 1e-5, "torch.bfloat16": 8e-3, "torch.float16": 1e-3}[dtype]


@pytest.mark.triton
def test_triton_kernels_under_interpreter_match_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["dequant"]) == 12 + 12 and all(row[-1] for row in out["dequant"]), [r for r in out["dequant"] if not r[-1]]
    assert len(out["linear"]) == 72
    for n_out, k, dt, m, split, err, meta_ok in out["linear"]:
        assert meta_ok, (n_out, k, dt, m)
        assert err <= _tolerance(dt), (n_out, k, dt, m, split, err)
    assert len(out["quant"]) == 5 and all(all(r[3:]) for r in out["quant"]), out["quant"]
    assert out["declined"]
    assert out["nan"] == [True, False, True, False]
    assert max(out["route"]) <= 1e-5
    assert out["gemv_ok"] == [False, True]  # 96 is not a multiple of 64: blocks straddle rows
    calls, *equal = out["hook"]
    assert calls == ["q", "d"] and all(equal), out["hook"]


# ----------------------------------------------------------------------------- real GPU
def cuda(test):
    """The ``gpu`` tier: runs where a CUDA device is, skipped (and so reported) elsewhere."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@cuda
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("code", ["nf4", "fp4"])
def test_cuda_quantize_dequantize_equal_cpu(code, double_quant):
    x = torch.randn(1024 + 3, 777) * 2
    q_cpu = nf4lib.quantize(x, code=code, double_quant=double_quant)
    q_gpu = nf4lib.quantize(x.cuda(), code=code, double_quant=double_quant)
    assert torch.equal(q_gpu.packed.cpu(), q_cpu.packed)
    assert torch.equal(q_gpu.scales.dequantize().cpu(), q_cpu.scales.dequantize())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(nf4lib.dequantize(q_gpu, dtype).cpu(), nf4lib.dequantize(q_cpu, dtype))
    bad = x.cuda()
    bad[5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        nf4lib.quantize(bad)


@cuda
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_linear_matches_cpu(m, dtype):
    from nf4lib.backends.cpu import kernels as cpu

    q = nf4lib.quantize(torch.randn(1536, 2048), double_quant=True)
    x = torch.randn(m, 2048).to(dtype)
    b = torch.randn(1536).to(dtype)
    ref = cpu.linear(x, q, b).float()
    y = nf4lib.quantized_linear(x.cuda(), q.to("cuda"), b.cuda()).float().cpu()
    # cuBLAS may use reduced-precision reductions for half types; fp32 is exact up to order
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert (y - ref).abs().max() <= tol * ref.abs().max()


@cuda
def test_cuda_opcheck_and_compile_fullgraph():
    q = nf4lib.quantize(torch.randn(256, 512, device="cuda"), double_quant=True)
    from nf4lib.ops.linear import _op, op_args

    for m in (1, 40):
        x = torch.randn(m, 512, device="cuda", requires_grad=True)
        torch.library.opcheck(_op, (x,), {"bias": None, **op_args(q)})
    f = torch.compile(lambda x: nf4lib.quantized_linear(x, q), fullgraph=True)
    x = torch.randn(4, 512, device="cuda")
    assert torch.allclose(f(x), nf4lib.quantized_linear(x, q), rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_backward_matches_cpu():
    q = nf4lib.quantize(torch.randn(384, 256))
    x = torch.randn(64, 256, requires_grad=True)
    nf4lib.quantized_linear(x, q).sum().backward()
    xg = x.detach().cuda().requires_grad_()
    nf4lib.quantized_linear(xg, q.to("cuda")).sum().backward()
    assert torch.allclose(xg.grad.cpu(), x.grad, rtol=1e-4, atol=1e-4)
