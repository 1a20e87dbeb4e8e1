"""The native CPU kernels (nf4lib.backends.cpu.native) against the pure-PyTorch kernels, which stay the
readable reference: the same bytes from quantize, the same values from dequantize, the
GEMV within float32 summation-order rounding; every instruction set this CPU runs
(scalar included), odd sizes, tails, every built-in codebook and a user one, plain and
double-quantized, thread-count independence, the fallback without the library."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import nf4lib
from nf4lib.backends.cpu import native as _native
from nf4lib.backends.cpu import eager as _quant

pytestmark = pytest.mark.skipif(not _native.available(), reason="native library not built")

ISAS = _native.supported_isas() if _native.available() else ()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
USER_CODE = torch.tensor([-1.0, -0.6, -0.25, 0.0, 0.1, 0.3, 0.55, 0.8, 1.0])


def _pure_quantize(x, **kw):
    with _native.disabled():
        return nf4lib.quantize(x, **kw)


def _pure_dequantize(q, dtype=None):
    with _native.disabled():
        return nf4lib.dequantize(q, dtype)


def _same_record(a, b):
    assert torch.equal(a.packed, b.packed)
    if a.double_quant:
        for f in ("codes", "scales", "offset"):
            assert torch.equal(getattr(a.absmax, f), getattr(b.absmax, f)), f
    else:
        assert torch.equal(a.absmax, b.absmax)


def test_scalar_is_always_there_and_the_isa_switch_works():
    assert ISAS[0] == "scalar" and _native.isa() in ISAS
    for name in ISAS:
        with _native.use_isa(name):
            assert _native.isa() == name
    with pytest.raises(ValueError, match="not available"):
        with _native.use_isa("sse9"):
            pass


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [16, 32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_and_dequantize_equal_the_pure_kernels(isa, dtype, blocksize, double_quant):
    # 3 * 4099 elements: not a multiple of any blocksize (a partial last block) and odd
    x = torch.randn(3, 4099).to(dtype) * 3
    want = _pure_quantize(x, blocksize=blocksize, double_quant=double_quant)
    with _native.use_isa(isa):
        got = nf4lib.quantize(x, blocksize=blocksize, double_quant=double_quant)
        _same_record(got, want)
        for out in DTYPES:
            assert torch.equal(nf4lib.dequantize(want, out), _pure_dequantize(want, out)), out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code", ["nf4", "fp4", "int4", USER_CODE])
def test_every_codebook(isa, code):
    x = torch.randn(130, 70, dtype=torch.bfloat16)
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.0])  # zeros and tiny values
    x[1] = 0.0  # an all-zero block
    want = _pure_quantize(x, code=code, blocksize=64)
    with _native.use_isa(isa):
        got = nf4lib.quantize(x, code=code, blocksize=64)
        _same_record(got, want)
        assert torch.equal(nf4lib.dequantize(want), _pure_dequantize(want))


@pytest.mark.parametrize("isa", ISAS)
def test_values_on_thresholds_and_extremes(isa):
    # values exactly on decision thresholds (ties go low), +-absmax, subnormals, fp16 range
    levels = nf4lib.nf4_levels()
    mids = (levels[1:] + levels[:-1]) / 2
    x = torch.cat([mids, -mids, levels, torch.tensor([1.0, -1.0, 1e-40, -1e-41])])
    x = torch.cat([x, torch.zeros(126 - x.numel())])
    with _native.use_isa(isa):
        for dtype in DTYPES:
            big = torch.finfo(dtype).max
            xs = torch.cat([x.to(dtype), torch.tensor([big, -big], dtype=dtype)])  # the block of the largest finite values
            _same_record(nf4lib.quantize(xs, blocksize=64), _pure_quantize(xs, blocksize=64))
    # tiny absmax: the 1e-38 clamp, and subnormal outputs in fp16 / bf16
    q = _pure_quantize(torch.full((64,), 1e-39))
    with _native.use_isa(isa):
        for out in DTYPES:
            assert torch.equal(nf4lib.dequantize(q, out), _pure_dequantize(q, out))


@pytest.mark.parametrize("isa", ISAS)
def test_nan_inf_absmax_decode_like_torch(isa):
    # A record with Inf/NaN scales (not one quantize makes): the same values as torch's
    # casts, bit for bit except NaN payloads (torch itself writes a bf16 NaN as 0x7FC0 in
    # its scalar cast and 0xFFFF in its vectorised one), which must be NaN in the same places.
    q = _pure_quantize(torch.randn(256))
    bad = nf4lib.QuantizedTensor(q.packed, torch.tensor([1.0, float("inf"), float("nan"), -2.0]), q.code, q.shape, q.dtype, 64)
    with _native.use_isa(isa):
        for out in DTYPES:
            got, want = nf4lib.dequantize(bad, out), _pure_dequantize(bad, out)
            nan = want.isnan()
            assert nan[128:192].all() and torch.equal(got.isnan(), nan), out
            bits = torch.int32 if out == torch.float32 else torch.int16
            assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), out
            assert got[64:128].isinf().any()  # code * inf


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_rejects_nan_and_inf_naming_the_block(isa):
    x = torch.randn(1000)
    x[700] = float("nan")
    x[900] = float("inf")
    with _native.use_isa(isa), pytest.raises(ValueError, match=r"2 NaN/Inf value\(s\); the first is element 700 \(block 10"):
        nf4lib.quantize(x)
    tail = torch.randn(100)
    tail[99] = float("-inf")  # in the partial last block
    with _native.use_isa(isa), pytest.raises(ValueError, match="element 99"):
        nf4lib.quantize(tail)


def _reference_linear(x, q, bias):
    # F.linear(x, dequantize(q).to(x.dtype), bias), in float32 so only summation order differs
    w = _pure_dequantize(q, x.dtype).float()
    return F.linear(x.float(), w, None if bias is None else bias.float())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
# (shape, blocksize): blocksize 32; 64 with K % 128 == 64 and 128 (the bf16 kernel's split-x path,
# a leftover group and none); K % 64 != 0; rows straddling blocks
@pytest.mark.parametrize("shape, blocksize", [((96, 256), 32), ((48, 320), 64), ((40, 512), 128), ((64, 200), 64), ((33, 40), 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_equals_the_dense_formula(isa, dtype, shape, blocksize, double_quant):
    q = _pure_quantize(torch.randn(shape, dtype=dtype), double_quant=double_quant, blocksize=blocksize)
    bias = torch.randn(shape[0], dtype=dtype)
    with _native.use_isa(isa):
        # the GEMV's passes of 8 rows; on the AMX level its GEMM from 2 rows, with one group
        # of 16 rows of x, two (20) or more (33)
        for m in (1, 2, 3, 5, 8, 9, 16, 20, 33):
            x = torch.randn(m, shape[1], dtype=dtype)
            got = _native.gemv(x, q, dtype, bias)
            want = _reference_linear(x, q, bias)
            # float32 sums of `in_features` products in another order: a few ulps of the
            # sum of |terms| (bound: K * eps * sum|w x|)
            scale = (x.float().abs() @ _pure_dequantize(q, dtype).float().abs().T) + bias.float().abs()
            assert ((got - want).abs() <= 4 * shape[1] * 2**-24 * scale + 1e-30).all(), m


@pytest.mark.parametrize("isa", ISAS)
# rows of x past the AMX GEMM's 4 sums per pass (130), its column chunks (600: a partial last
# chunk) and its runs of weight rows (600 rows of x, 200 weight rows: three runs, a 16-row tail);
# 5 and 30 rows take its few-rows loop (two groups of 16 rows of x at 30)
@pytest.mark.parametrize("m, n", [(5, 37), (30, 45), (130, 70), (600, 200)])
# blocksize 32: panels in element order (k = 2080, 65 tiles of 32 columns); 64: split panels
# (k = 2112, 33 groups of 64 columns), as the GEMV's split x
@pytest.mark.parametrize("blocksize, k", [(32, 2080), (64, 2112)])
def test_bf16_gemm_on_many_rows_equals_the_dense_formula(isa, m, n, blocksize, k):
    q = _pure_quantize(torch.randn(n, k, dtype=torch.bfloat16), blocksize=blocksize, double_quant=True)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    with _native.use_isa(isa):
        got = _native.gemv(x, q, torch.bfloat16, bias)
    want = _reference_linear(x, q, bias)
    scale = (x.float().abs() @ _pure_dequantize(q, torch.bfloat16).float().abs().T) + bias.float().abs()
    assert ((got - want).abs() <= 4 * k * 2**-24 * scale + 1e-30).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 9, 33])  # the bf16 GEMV; the AMX GEMM where the CPU has it
def test_bf16_gemv_with_extreme_scales(isa, blocksize, rows):
    # scales whose products are bf16 subnormals, zero, tiny and huge: the AVX512-BF16 GEMV
    # converts a block's (or two blocks') products with vcvt(ne2)ps2bf16 only where that
    # rounds as the reference does, and the dense formula must hold for every block
    n, k = 8, 512
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    nb = n * k // blocksize
    extremes = torch.tensor([1e-39, 0.0, 2.0**-100, 2.0**-101, 1e-30, 1e30, 1.0, 5e-41])
    # every extreme next to an ordinary scale and next to each other extreme (block pairs)
    absmax = torch.rand(nb, generator=torch.Generator().manual_seed(2))
    pattern = torch.stack([extremes, torch.rand(len(extremes)), extremes.roll(1), extremes.roll(3)], 1).flatten()
    absmax[: min(nb, len(pattern))] = pattern[:nb]
    q = nf4lib.QuantizedTensor(packed, absmax, nf4lib.nf4_levels(), (n, k), torch.bfloat16, blocksize)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3)).bfloat16()
    with _native.use_isa(isa):
        got = _native.gemv(x, q, torch.bfloat16, None)
    w = _pure_dequantize(q, torch.bfloat16).float()
    # vdpbf16ps and tdpbf16ps count bf16 subnormal weights as zero (as the instructions define)
    tiny = w.abs() < torch.finfo(torch.bfloat16).tiny
    want, want_flushed = x.float() @ w.T, x.float() @ w.masked_fill(tiny, 0).T
    scale = x.float().abs() @ w.abs().T
    bound = 4 * k * 2**-24 * scale + 1e-30
    assert (((got - want).abs() <= bound) | ((got - want_flushed).abs() <= bound)).all()


@pytest.mark.parametrize("isa", ISAS)
# (out_features, in_features, blocksize): columns in whole and partial calls of 128 (320, 96),
# a partial last panel of 512 weight rows (608), blocksize 32 / 64 / 128, double-quantized
@pytest.mark.parametrize("shape, blocksize, double_quant", [((96, 320), 32, True), ((608, 160), 64, False),
                                                            ((64, 96), 128, False), ((256, 512), 64, True)])
def test_bf16_input_grad_equals_the_dense_formula(isa, shape, blocksize, double_quant):
    # dL/dx = g @ W on the AMX tiles, float32 sums; None on the levels without that kernel
    q = _pure_quantize(torch.randn(shape, dtype=torch.bfloat16), blocksize=blocksize, double_quant=double_quant)
    w = _pure_dequantize(q, torch.bfloat16).float()
    for m in (1, 7, 16, 17, 40):  # partial and odd groups of 16 rows of g
        g = torch.randn(m, shape[0], dtype=torch.bfloat16)
        with _native.use_isa(isa):
            got = _native.input_grad_bf16(g, q)
        if isa != "amx":
            assert got is None
            continue
        want, scale = g.float() @ w, g.float().abs() @ w.abs()
        assert got.shape == (m, shape[1]) and ((got - want).abs() <= 4 * shape[0] * 2**-24 * scale + 1e-30).all(), m


@pytest.mark.parametrize("shape, blocksize", [((100, 64), 64), ((64, 80), 64), ((64, 64), 16)])
def test_bf16_input_grad_declines_shapes_it_cannot_tile(shape, blocksize):
    # out_features or in_features not a multiple of 32, blocksize 16: the caller's tiles instead
    q = _pure_quantize(torch.randn(shape), blocksize=blocksize)
    assert _native.input_grad_bf16(torch.randn(3, shape[0]).bfloat16(), q) is None


def test_bf16_input_grad_with_extreme_scales():
    # the pair tables' slow path: scales whose products are NaN, Inf, bf16 subnormals or zero
    n, k = 64, 128
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    absmax = torch.rand(n * k // 64, generator=torch.Generator().manual_seed(2))
    absmax[:8] = torch.tensor([1e-39, 0.0, 2.0**-101, 1e30, 5e-41, 1.0, 2.0**-100, 3e-39])
    absmax[10] = float("inf")
    absmax[17] = float("nan")
    q = nf4lib.QuantizedTensor(packed, absmax, nf4lib.nf4_levels(), (n, k), torch.bfloat16, 64)
    g = torch.randn(5, n, generator=torch.Generator().manual_seed(3)).bfloat16()
    g[:, 5] = 0  # row 5 holds the Inf block (10) and row 8 the NaN one (17): zero only one of them
    got = _native.input_grad_bf16(g, q)
    if got is None:
        pytest.skip("no AMX backward on this CPU")
    w = _pure_dequantize(q, torch.bfloat16).float()
    want = g.float() @ w.nan_to_num(posinf=0.0, neginf=0.0)
    # NaN weights (the NaN scale; code 0 times Inf) reach every row of g, and so do Inf ones
    # (times g's zeros in row 5)
    bad = ~w.isfinite().all(0)
    assert bad.any() and got[:, bad].isnan().all()
    rest = ~bad
    # tdpbf16ps counts bf16 subnormal weights as zero (as the instruction defines)
    tiny = w.abs() < torch.finfo(torch.bfloat16).tiny
    flushed = g.float() @ w.masked_fill(tiny, 0).nan_to_num(posinf=0.0, neginf=0.0)
    scale = g.float().abs() @ w.nan_to_num(posinf=0.0, neginf=0.0).abs()
    bound = (4 * n * 2**-24 * scale + 1e-30)[:, rest]
    diff, diff_flushed = (got - want)[:, rest].abs(), (got - flushed)[:, rest].abs()
    assert ((diff <= bound) | (diff_flushed <= bound)).all()


def test_cpu_backward_takes_the_amx_kernel_where_there_is_one():
    # bf16 x through quantized_linear: x.grad is the AMX kernel's float32 sums, rounded once
    q = nf4lib.quantize(torch.randn(96, 128, dtype=torch.bfloat16))
    x = torch.randn(20, 128, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(20, 96, dtype=torch.bfloat16)
    nf4lib.quantized_linear(x, q).backward(upstream)
    direct = _native.input_grad_bf16(upstream, q)
    if direct is None:
        pytest.skip("no AMX backward on this CPU")
    assert torch.equal(x.grad, direct.bfloat16())


@pytest.mark.parametrize("batch", [1, 4, 7, 16, 17, 64])  # the GEMV, then tiles (from 7 or 17 rows by CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_linear_equals_the_pure_kernel(batch, dtype):
    q = _pure_quantize(torch.randn(128, 320, dtype=dtype))
    x = torch.randn(batch, 320, dtype=dtype)
    bias = torch.randn(128, dtype=dtype)
    with _native.disabled():
        want = nf4lib.quantized_linear(x, q, bias)
    got = nf4lib.quantized_linear(x, q, bias)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # fp32 order; one half-precision rounding of the output
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    # 3-D inputs and a non-contiguous x
    x3 = torch.randn(2, 320, batch, dtype=dtype).transpose(1, 2)
    torch.testing.assert_close(nf4lib.quantized_linear(x3, q), _reference_linear(x3, q, None).to(dtype),
                               rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])  # native and pure tiles
def test_linear_runs_inside_and_then_outside_inference_mode(dtype):
    # the tile buffer is reused across calls: one first made under inference_mode must still
    # be writable by the next call outside it
    q = nf4lib.quantize(torch.randn(96, 128))
    x = torch.randn(40, 128, dtype=dtype)
    with torch.inference_mode():
        inside = nf4lib.quantized_linear(x, q)
    outside = nf4lib.quantized_linear(x, q)
    assert torch.equal(inside, outside)


def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(512, 1024, dtype=torch.bfloat16)
    v = torch.randn(3, 1024, dtype=torch.bfloat16)
    v40 = torch.randn(40, 1024, dtype=torch.bfloat16)  # the AMX GEMM where the CPU has it
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            q = nf4lib.quantize(x, double_quant=True)
            results.append((q, nf4lib.dequantize(q), nf4lib.quantized_linear(v, q), nf4lib.quantized_linear(v40, q)))
    finally:
        torch.set_num_threads(old)
    for q, w, y, y40 in results[1:]:
        _same_record(q, results[0][0])
        assert torch.equal(w, results[0][1]) and torch.equal(y, results[0][2]) and torch.equal(y40, results[0][3])


def test_calls_from_short_lived_threads_give_the_same_results():
    # each thread keeps its own scratch for the AMX GEMM (freed when the thread ends)
    import threading

    q = nf4lib.quantize(torch.randn(96, 256))
    x = torch.randn(9, 256, dtype=torch.bfloat16)
    want = _native.gemv(x, q, torch.bfloat16, None)
    got = []
    for _ in range(4):
        t = threading.Thread(target=lambda: got.append(_native.gemv(x, q, torch.bfloat16, None)))
        t.start()
        t.join()
    assert len(got) == 4 and all(torch.equal(g, want) for g in got)


def test_large_quantize_compiles_nothing(monkeypatch):
    """With the native kernel, even large tensors skip the inductor-compiled path."""

    def refuse(*args):
        raise AssertionError("the compiled kernel ran")

    monkeypatch.setattr(_quant, "_fused_rows", refuse)
    x = torch.randn(2048, 2048)  # 4M elements: above the compiled path's threshold
    q = nf4lib.quantize(x)
    assert q.packed.numel() == x.numel() // 2


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000), bs_log=st.integers(4, 9), dq=st.booleans(),
    dtype=st.sampled_from(DTYPES), isa=st.sampled_from(ISAS or ("scalar",)), seed=st.integers(0, 2**16),
)
def test_property_native_equals_pure(n, bs_log, dq, dtype, isa, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=gen) * torch.rand(1, generator=gen) * 10).to(dtype)
    want = _pure_quantize(x, blocksize=2**bs_log, double_quant=dq)
    with _native.use_isa(isa):
        got = nf4lib.quantize(x, blocksize=2**bs_log, double_quant=dq)
        _same_record(got, want)
        for out in DTYPES:
            assert torch.equal(nf4lib.dequantize(want, out), _pure_dequantize(want, out))


def test_a_failed_self_check_falls_back_a_level(monkeypatch):
    lib = _native._lib()
    before = lib.nf4_get_isa()
    monkeypatch.setattr(_native, "_self_check", lambda lib: lib.nf4_get_isa() == 0)
    try:
        with pytest.warns(UserWarning, match="disagree with the scalar ones"):
            lib.nf4_set_isa(len(ISAS) - 1)
            if lib.nf4_get_isa() == 0:
                pytest.skip("only the scalar path on this CPU")
            _native._select_isa(lib)
        assert lib.nf4_get_isa() == 0
    finally:
        lib.nf4_set_isa(before)


def _run(code, **env):
    full = dict(os.environ, **env)
    if "NF4LIB_ISA" not in env:
        full.pop("NF4LIB_ISA", None)  # the child picks its own instruction set
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=full, capture_output=True, text=True, timeout=300)


_PROBE = (
    "import torch, nf4lib\nfrom nf4lib.backends.cpu import native as _native\n"
    "x = torch.randn(300, 130)\nq = nf4lib.quantize(x)\nw = nf4lib.dequantize(q)\n"
    "with _native.disabled():\n    q2 = nf4lib.quantize(x)\n"
    "print(_native.isa(), bool(torch.equal(q.packed, q2.packed)), bool(torch.equal(w, nf4lib.dequantize(q2))))\n"
)


@pytest.mark.slow
def test_without_the_library_nf4lib_warns_once_and_computes_the_same():
    out = _run(_PROBE + "nf4lib.dequantize(q)\n", NF4LIB_NATIVE_LIB="/nonexistent/libnf4cpu.so")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["none", "True", "True"]
    assert out.stderr.count("native CPU kernels unavailable") == 1, out.stderr


@pytest.mark.slow
def test_environment_switches():
    off = _run(_PROBE, NF4LIB_NATIVE="0")
    assert off.returncode == 0 and off.stdout.split()[0] == "none" and "unavailable" not in off.stderr
    scalar = _run(_PROBE, NF4LIB_ISA="scalar")
    assert scalar.returncode == 0 and scalar.stdout.split() == ["scalar", "True", "True"], scalar.stderr
    bad = _run(_PROBE, NF4LIB_ISA="mmx")
    assert bad.returncode == 0 and "NF4LIB_ISA must be one of" in bad.stderr


def test_kernels_share_pytorchs_openmp_threads():
    # PyTorch's CPU wheel runs on GNU OpenMP: the kernels then run on its threads, not a
    # second pool competing with its spinning ones (NF4LIB_THREADS=own keeps the pool)
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("PyTorch here does not use OpenMP")
    assert _native.openmp_threads()


@pytest.mark.slow
def test_own_thread_pool_and_openmp_threads_give_the_same_results():
    code = (
        "import torch, nf4lib\nfrom nf4lib.backends.cpu import native\ntorch.manual_seed(0)\ntorch.set_num_threads(2)\n"
        "w = torch.randn(1024, 1024, dtype=torch.bfloat16)\nq = nf4lib.quantize(w, double_quant=True)\n"
        "x = torch.randn(3, 1024, dtype=torch.bfloat16)\n"
        "y = nf4lib.quantized_linear(x, q).float().sum().item()\n"
        "print(native.openmp_threads(), q.packed.int().sum().item(), nf4lib.dequantize(q).float().sum().item(), y)\n"
    )
    own, omp = _run(code, NF4LIB_THREADS="own"), _run(code)
    assert own.returncode == 0 and omp.returncode == 0, own.stderr + omp.stderr
    assert own.stdout.split()[0] == "False"
    assert own.stdout.split()[1:] == omp.stdout.split()[1:]


@pytest.mark.slow
def test_the_thread_pool_works_in_a_forked_child():
    code = (
        "import os, torch, nf4lib\ntorch.set_num_threads(2)\n"
        "q = nf4lib.quantize(torch.randn(1024, 1024))\nw = nf4lib.dequantize(q)\n"  # parent's pool started
        "pid = os.fork()\n"
        "if pid == 0:\n"
        # the parent ran on PyTorch's OpenMP threads, which a fork does not carry over (PyTorch's
        # own parallel ops hang in such a child): the kernels go back to their own pool, on 2
        # threads, and the results are compared as bytes, without a parallel torch op
        "    b = lambda t: t.numpy().tobytes()\n"
        "    ok = b(nf4lib.dequantize(q)) == b(w) and b(nf4lib.quantize(w).packed) == b(q.packed)\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\nprint(os.waitstatus_to_exitcode(status))\n"
    )
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr
