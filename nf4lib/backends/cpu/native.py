"""The optional native CPU kernels (``csrc/``), loaded with ctypes.

A small C library, built when the package is installed (``setup.py``: an optional
extension, plain C with no Python or PyTorch headers, so one build serves every PyTorch
version). It decodes (dequantize, and the fused decode-dot GEMV of small batches) and
quantizes at close to memory speed, with runtime dispatch between AVX-512, AVX2 and a
portable scalar path, multithreaded over ``torch.get_num_threads()`` threads. Every
kernel computes the values of the default pure-PyTorch kernels (``backends.default``, the readable
reference): the same bytes from quantize, the same values from dequantize, and the
GEMV within float32 summation-order rounding.

Without the library (no C compiler at install, a failed load) nf4lib warns once and
runs the pure-PyTorch kernels. Switches:

* ``NF4LIB_NATIVE=0``: never use the library (read once, at the first kernel call).
* ``NF4LIB_ISA=scalar|avx2|avx512|avx512bf16|amx``: the instruction set to use (capped at what the CPU
  runs); :func:`use_isa` does the same for a block of code.
* ``NF4LIB_NATIVE_LIB=PATH``: load this file instead of the packaged one.
* ``NF4LIB_THREADS=own``: run parallel work on the library's own thread pool. By default,
  when PyTorch runs on GNU OpenMP, the work runs on PyTorch's OpenMP threads: its idle
  threads spin after each parallel op, and a second pool beside them would share the cores
  with spinning threads (measured: decode steps at two thirds of the speed on 2 cores).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import os
import pathlib
import threading
import warnings

import numpy
import torch

from ...core.records import DoubleQuantized, QuantizedTensor

__all__ = [
    "available", "isa", "supported_isas", "use_isa", "disabled", "usable", "decode_into", "gemv", "quantize_into",
    "quantize_mse_into",
]

ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ABI = 7
# An entry point refused buffers that do not cover its work (nf4cpu.h: NF4_EARGS), or has no
# kernel for the work on the instruction set in use (NF4_EUNAVAILABLE).
_EARGS, _EUNAVAILABLE = -2, -3
_lock = threading.RLock()  # re-entered by the self-check, which quantizes with the library off
_state = {"lib": None, "tried": False, "off": 0, "openmp": False}


class _Scales(ctypes.Structure):
    # mirrors nf4_scales in nf4cpu.h
    _fields_ = [
        ("absmax", ctypes.c_void_p), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
        ("map", ctypes.c_void_p), ("offset", ctypes.c_float), ("group_shift", ctypes.c_int64),
        ("n_absmax", ctypes.c_int64), ("n_scales", ctypes.c_int64), ("n_map", ctypes.c_int64),
    ]


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "nf4_abi_version": ([], _INT),
    "nf4_best_isa": ([], _INT),
    "nf4_set_isa": ([_INT], _INT),
    "nf4_get_isa": ([], _INT),
    "nf4_set_openmp": ([_P], _INT),
    "nf4_decode": ([_P, _I64, ctypes.POINTER(_Scales), _P, _I64, _I64, _I64, _P, _I64, _INT, _INT], _INT),
    "nf4_gemv": ([_P, _INT, _I64, _I64, _I64, _I64, _P, _I64, ctypes.POINTER(_Scales), _P, _I64, _INT, _P, _I64, _P, _I64, _INT], _INT),
    "nf4_gemm_t": ([_P, _I64, _I64, _I64, _I64, _P, _I64, ctypes.POINTER(_Scales), _P, _I64, _P, _I64, _INT], _INT),
    "nf4_quantize": ([_P, _INT, _I64, _I64, _P, _P, _P, _I64, _P, _I64, _INT], _INT),
    "nf4_quantize_mse": ([_P, _INT, _I64, _I64, _P, _I64, _P, _P, _P, _P, _INT, _INT, _P, _I64, _P, _I64, _INT], _INT),
}


def _library_path() -> pathlib.Path | None:
    override = os.environ.get("NF4LIB_NATIVE_LIB")
    if override:
        return pathlib.Path(override)
    here = pathlib.Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_nf4cpu{suffix}"
        if path.exists():
            return path
    return None


def _load():
    path = _library_path()
    if path is None:
        raise OSError("the library was not built (no C compiler when nf4lib was installed?)")
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.nf4_abi_version() != _ABI:
        raise OSError(f"{path.name} has ABI version {lib.nf4_abi_version()}, expected {_ABI}: rebuild it (pip install -e .)")
    _state["openmp"] = bool(lib.nf4_set_openmp(_gomp_parallel()))
    return lib


def _gomp_parallel() -> int | None:
    """The address of GNU OpenMP's ``GOMP_parallel`` when PyTorch's parallel backend is
    GNU OpenMP and the process has it loaded (PyTorch loads it globally), else None: the
    native kernels then share PyTorch's threads instead of starting their own."""
    if os.environ.get("NF4LIB_THREADS", "openmp") == "own":
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p).value
    except AttributeError:  # no GNU-compatible OpenMP entry point in the process
        return None


def openmp_threads() -> bool:
    """True when the native kernels run their parallel work on PyTorch's OpenMP threads
    (``NF4LIB_THREADS``), False on the library's own pool or without the library."""
    return _lib() is not None and _state["openmp"]


def _lib():
    """The loaded library, or None (disabled, or unavailable: warned once)."""
    if _state["off"] or _env_off():
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    lib = _load()
                    _select_isa(lib)
                    _state["lib"] = lib
                except (OSError, AttributeError) as err:
                    warnings.warn(f"nf4lib: native CPU kernels unavailable ({err}); using the pure-PyTorch kernels", stacklevel=3)
                _state["tried"] = True
    return _state["lib"]


@functools.lru_cache(maxsize=1)
def _env_off() -> bool:
    # read once per process: this runs on every kernel call
    return os.environ.get("NF4LIB_NATIVE", "1") == "0"


def _select_isa(lib) -> None:
    wanted = os.environ.get("NF4LIB_ISA")
    if wanted is not None:
        if wanted not in ISAS:
            raise OSError(f"NF4LIB_ISA must be one of {ISAS}, got {wanted!r}")
        lib.nf4_set_isa(ISAS.index(wanted))
    # A self-check of the chosen SIMD path against the scalar one: a wrong result on a
    # CPU these kernels were never run on (AVX-512 was not available where they were
    # written) falls back a level instead of returning wrong numbers.
    while lib.nf4_get_isa() > 0 and not _self_check(lib):
        bad = ISAS[lib.nf4_get_isa()]
        lib.nf4_set_isa(lib.nf4_get_isa() - 1)
        warnings.warn(f"nf4lib: the {bad} kernels disagree with the scalar ones on this CPU; using {ISAS[lib.nf4_get_isa()]}")


# Every blocksize the kernels accept (csrc/nf4cpu.h: nf4_blocksize_ok; ``core.checks.validate``).
BLOCKSIZES = tuple(1 << p for p in range(4, 17))


def _self_check(lib) -> bool:
    """The chosen SIMD path against the scalar one, on random codes and scales, at every
    blocksize the kernels accept (plain and double-quantized, whole and partial ranges,
    three output dtypes, the GEMV in three rounding dtypes, bf16 activations through the GEMV
    and the GEMMs, and the backward's bf16 GEMM where the level has one): ~50 ms, once per
    process."""
    gen = torch.Generator().manual_seed(0)
    code = torch.linspace(-1, 1, 16)
    chosen = lib.nf4_get_isa()
    for bs in BLOCKSIZES:
        # rows of 192 (short sums, so a tight tolerance), 2.5 blocks or more (a partial last
        # one), a multiple of 32 rows (the shape the backward's AMX GEMM takes)
        shape = (-(-max(24, -(-5 * bs // (2 * 192))) // 32) * 32, 192)
        n = shape[0] * shape[1]
        nb = -(-n // bs)
        packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=gen)
        plain = QuantizedTensor(packed, torch.rand(nb, generator=gen), code, shape, torch.float32, bs)
        nested = DoubleQuantized(torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=gen),
                                 torch.rand(-(-nb // 4), generator=gen), torch.tensor(0.25), torch.linspace(-1, 1, 256), 4)
        x = torch.randn(3, shape[1], generator=gen)
        x33 = torch.randn(33, shape[1], generator=gen).bfloat16()
        g17 = torch.randn(17, shape[0], generator=gen).bfloat16()  # a partial group of 16 rows
        for q in (plain, QuantizedTensor(packed, nested, code, shape, torch.float32, bs)):
            results = []
            for level in (chosen, 0):
                lib.nf4_set_isa(level)
                out = []
                for d in _CODES:
                    whole, part = torch.empty(n, dtype=d), torch.empty(n - 8, dtype=d)
                    decode_into(whole, q, lib=lib)
                    decode_into(part, q, 3, n - 5, lib=lib)  # unaligned ends
                    out += [whole, part]
                ys = [gemv(x, q, d, None, lib=lib) for d in _CODES]
                # bf16 activations at 1, 3 and 33 rows: the GEMV (33: four passes of 8, then
                # 1); on the AMX level 3 and 33 rows take its GEMM, in its two loop orders
                ys += [gemv(r, q, torch.bfloat16, None, lib=lib) for r in (x[:1].bfloat16(), x.bfloat16(), x33)]
                results.append((out, ys, input_grad_bf16(g17, q, lib=lib)))
            lib.nf4_set_isa(chosen)
            (fast, y_fast, grad_fast), (slow, y_slow, _) = results
            # compared as bytes in numpy: a large torch.equal would start torch's OpenMP pool at
            # load time, and a process that forks after that cannot use OpenMP in the child
            if not all(_bytes(a) == _bytes(b) for a, b in zip(fast, slow)):
                return False
            if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(y_fast, y_slow)):
                return False
            if grad_fast is not None:  # against g @ W with the scalar decode's bf16 weights
                # (numpy's own loops: a torch matmul could start torch's OpenMP pool, numpy's
                # matmul its BLAS threads)
                w, g = slow[2].view(shape).float().numpy().astype("float64"), g17.float().numpy().astype("float64")
                bound = 4 * shape[0] * 2.0**-24 * numpy.einsum("ik,kj->ij", abs(g), abs(w)) + 1e-30
                if not (abs(grad_fast.numpy() - numpy.einsum("ik,kj->ij", g, w)) <= bound).all():
                    return False
    return True


def _bytes(t: torch.Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes()


def available() -> bool:
    """True when the native library is loaded and enabled."""
    return _lib() is not None


def isa() -> str:
    """The instruction set the native kernels use now: ``"scalar"``, ``"avx2"``, ``"avx512"``,
    ``"avx512bf16"`` (AVX-512 plus the bf16 dot-product GEMV for bf16 activations) or
    ``"amx"`` (those plus a bf16 GEMM on AMX tiles for bf16 activations, any batch)."""
    lib = _lib()
    return "none" if lib is None else ISAS[lib.nf4_get_isa()]


def supported_isas() -> tuple:
    """The instruction sets this CPU (and build) can run, slowest first."""
    lib = _lib()
    return () if lib is None else ISAS[: lib.nf4_best_isa() + 1]


@contextlib.contextmanager
def use_isa(name: str):
    """Run the native kernels with instruction set ``name`` inside the block (tests,
    benchmarks). Raises ValueError if the CPU cannot run it or the library is missing."""
    lib = _lib()
    if name not in supported_isas():
        raise ValueError(f"instruction set {name!r} is not available here (supported: {supported_isas()})")
    old = lib.nf4_get_isa()
    lib.nf4_set_isa(ISAS.index(name))
    try:
        yield
    finally:
        lib.nf4_set_isa(old)


@contextlib.contextmanager
def disabled():
    """Use the pure-PyTorch kernels inside the block (nesting allowed)."""
    with _lock:
        _state["off"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["off"] -= 1


def usable(*tensors, in_kernel: bool = False) -> bool:
    """True when these tensors can go through the native kernels: the library is there,
    no torch.func transform or compile is tracing, and they are plain CPU tensors with
    storage. Outside an op's kernel none may need a gradient (the native kernels record
    no autograd graph); inside one (``in_kernel=True``, below the autograd key) the op's
    own formula handles gradients, so a tensor that requires grad is fine, and the layer
    computes the same way whether or not anything needs a gradient."""
    # tracing first: compile cannot trace _lib()'s first-load lock
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or _lib() is None:
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return False
        # functorch wrappers (vmap, grad levels) are typed torch.Tensor but have no storage
        if t.device.type != "cpu" or (t.requires_grad and not in_kernel) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _scales_struct(q):
    """(struct, tensors to keep alive) for a record's per-block scales."""
    absmax = q.absmax
    if isinstance(absmax, DoubleQuantized):
        keep = [absmax.codes.contiguous(), absmax.scales.float().contiguous(), absmax.code.float().contiguous()]
        s = _Scales(None, _ptr(keep[0]), _ptr(keep[1]), _ptr(keep[2]), float(absmax.offset), absmax.blocksize.bit_length() - 1,
                    keep[0].numel(), keep[1].numel(), keep[2].numel())
    else:
        keep = [absmax.float().contiguous()]
        s = _Scales(_ptr(keep[0]), None, None, None, 0.0, 0, keep[0].numel(), 0, 0)
    return s, keep


def _refused(rc: int, what: str) -> None:
    if rc == _EARGS:
        # validate() runs before every call, so this is a bug, not bad input: say so plainly
        raise ValueError(f"nf4lib: the native {what} kernel refused buffers that do not cover its work")


def _code16(q) -> torch.Tensor:
    """The codebook as the 16 float32 levels the kernels read (a copy only when it is shorter
    or of another dtype: NF4's and FP4's are used in place, on every call)."""
    code = q.code
    if code.numel() == 16 and code.dtype == torch.float32 and code.is_contiguous():
        return code
    out = torch.zeros(16, dtype=torch.float32)
    out[: code.numel()] = code.float()
    return out


def _threads() -> int:
    return max(1, torch.get_num_threads())


# Outputs from this size are written with non-temporal stores (they would not stay in
# cache anyway); smaller ones, such as the linear kernel's tiles, stay cached for the matmul.
_STREAM_BYTES = 8 << 20


def decode_into(out: torch.Tensor, q, start: int = 0, stop: int | None = None, *, cached: bool = False, lib=None) -> None:
    """Write elements ``[start, stop)`` of ``q``'s flattened weight into ``out``
    (contiguous float32/bf16/fp16, ``stop - start`` elements), as ``dequantize`` would.
    ``cached``: the caller reads ``out`` next (a tile for a matmul), so it is written with
    plain stores even when large; otherwise outputs from ``_STREAM_BYTES`` bypass the caches."""
    lib = lib or _lib()
    stop = q.numel if stop is None else stop
    stream = not cached and (stop - start) * out.element_size() >= _STREAM_BYTES
    mode = _CODES[out.dtype] | (256 if stream else 0)
    scales, keep = _scales_struct(q)
    packed, code = q.packed.contiguous(), _code16(q)
    if not out.is_contiguous():
        raise ValueError("nf4lib: the native decode writes a contiguous output only")
    rc = lib.nf4_decode(_ptr(packed), packed.numel(), ctypes.byref(scales), _ptr(code), q.blocksize, start, stop, _ptr(out),
                        out.numel(), mode, _threads())
    del keep
    _refused(rc, "decode")


def gemv(x: torch.Tensor, q, dtype: torch.dtype, bias: torch.Tensor | None, *, lib=None) -> torch.Tensor:
    """``x @ W.T + bias`` in float32, ``x`` ``(m, in_features)``, each weight rounded to
    ``dtype`` as ``dequantize(q).to(dtype)`` has it; returns float32 ``(m, out_features)``."""
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    planned_gemv(GemvPlan(q), x, dtype, bias, y, lib=lib)
    return y


def input_grad_bf16(grad: torch.Tensor, q, *, lib=None) -> torch.Tensor | None:
    """``dL/dx = grad @ W`` in float32 for bf16 ``grad`` ``(m, out_features)``, each weight
    ``bf16(code * absmax)`` as ``dequantize(q).to(torch.bfloat16)`` has it, on the AMX tiles;
    None where the instruction set in use has no such kernel or the shape does not fit it
    (``out_features`` and ``in_features`` multiples of 32, blocksize >= 32)."""
    out_f, in_f = q.shape
    g = grad.contiguous()
    y = torch.empty(g.shape[0], in_f, dtype=torch.float32)
    scales, keep = _scales_struct(q)
    packed, code = q.packed.contiguous(), _code16(q)
    rc = (lib or _state["lib"]).nf4_gemm_t(
        g.data_ptr(), g.numel(), g.shape[0], out_f, in_f, _ptr(packed), packed.numel(), ctypes.byref(scales), _ptr(code),
        q.blocksize, y.data_ptr(), y.numel(), torch.get_num_threads(),
    )
    if rc == _EUNAVAILABLE:
        return None
    if rc != 0:
        _refused(rc, "backward GEMM")
        raise MemoryError("nf4lib: the native backward GEMM could not allocate its scratch buffer")
    return y


class GemvPlan:
    """A validated record's arguments to the native GEMV, prepared once: what a frozen
    weight can cache so that a small call pays only for ``x`` (see ``kernels.planned_linear``)."""

    __slots__ = ("out_f", "in_f", "bs", "packed", "scales", "code", "keep", "fixed")

    def __init__(self, q):
        self.out_f, self.in_f = q.shape
        self.bs = q.blocksize
        self.scales, keep = _scales_struct(q)
        self.packed, self.code = q.packed.contiguous(), _code16(q)
        self.keep = (keep, self.packed, self.code)  # the buffers the struct points into
        # the weight's arguments, in the entry point's order (after x, x's dtype, len and m)
        self.fixed = (self.out_f, self.in_f, _ptr(self.packed), self.packed.numel(), ctypes.byref(self.scales),
                      _ptr(self.code), self.bs)


def active() -> bool:
    """True while the loaded library is enabled (not inside :func:`disabled`)."""
    return not _state["off"] and _state["lib"] is not None


def planned_gemv(plan: GemvPlan, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None, y: torch.Tensor,
                 *, lib=None) -> None:
    """:func:`gemv` with a prepared weight: ``y`` (float32, contiguous, ``m * out_f``) =
    ``x @ W.T + bias`` for ``x`` ``(m, in_f)`` (any float dtype, any strides). bf16 x with
    bf16 weights goes in as it is (the AVX512-BF16 kernel multiplies bf16 pairs); anything
    else is widened to float32, exactly."""
    xf = x if x.dtype == torch.bfloat16 and dtype == torch.bfloat16 else x.float()
    if not xf.is_contiguous():
        xf = xf.contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    rc = (lib or _state["lib"]).nf4_gemv(
        xf.data_ptr(), _CODES[xf.dtype], xf.numel(), xf.shape[0], *plan.fixed, _CODES[dtype],
        None if bias is None else bias.data_ptr(), 0 if bias is None else bias.numel(), y.data_ptr(), y.numel(),
        torch.get_num_threads(),
    )
    if rc != 0:
        _refused(rc, "GEMV")
        raise MemoryError("nf4lib: the native GEMV could not allocate its scratch buffer")


def _search_tables(thresholds: torch.Tensor, storage: torch.Tensor | None):
    """The kernels' float32 thresholds and uint8 sorted-index -> stored-code map (identity for None)."""
    thr = thresholds.float().contiguous()
    st = torch.arange(16, dtype=torch.uint8) if storage is None else storage.to(torch.uint8).contiguous()
    return thr, st


def quantize_into(flat: torch.Tensor, blocksize: int, thresholds: torch.Tensor, storage: torch.Tensor | None,
                  packed: torch.Tensor, absmax: torch.Tensor) -> bool:
    """Quantize the contiguous CPU tensor ``flat`` into ``packed`` / ``absmax`` (as
    ``quantize`` lays them out); False if it holds a NaN or Inf."""
    lib = _lib()
    thr, st = _search_tables(thresholds, storage)
    bad = lib.nf4_quantize(_ptr(flat), _CODES[flat.dtype], flat.numel(), blocksize, _ptr(thr), _ptr(st), _ptr(packed),
                           packed.numel(), _ptr(absmax), absmax.numel(), _threads())
    _refused(bad, "quantize")
    return not bad


def quantize_mse_into(flat: torch.Tensor, blocksize: int, thresholds: torch.Tensor, levels16: torch.Tensor,
                      storage: torch.Tensor | None, weights: torch.Tensor | None, ratios: torch.Tensor, steps: int,
                      packed: torch.Tensor, scales: torch.Tensor) -> bool:
    """``core.mse.search`` and encoding for the contiguous CPU tensor ``flat``
    (``weights``: None or contiguous float32, element i's weight ``weights[i % len]``);
    False if it holds a NaN or Inf."""
    lib = _lib()
    thr, st = _search_tables(thresholds, storage)
    lev = levels16.float().contiguous()
    r = ratios.float().contiguous()
    wp = _ptr(weights) if weights is not None else None
    period = weights.numel() if weights is not None else 1
    rc = lib.nf4_quantize_mse(
        _ptr(flat), _CODES[flat.dtype], flat.numel(), blocksize, wp, period, _ptr(thr), _ptr(lev), _ptr(st),
        _ptr(r), r.numel(), steps, _ptr(packed), packed.numel(), _ptr(scales), scales.numel(), _threads(),
    )
    _refused(rc, "MSE quantize")
    if rc < 0:
        raise MemoryError("nf4lib: the native MSE quantize kernel could not allocate its scratch buffers")
    return rc == 0
