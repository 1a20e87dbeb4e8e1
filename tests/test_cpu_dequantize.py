"""CPU dequantize of large tensors in the pure-PyTorch path (the fallback without the
native library): huge-page output buffers and the two-thread split."""

import pathlib
import sys

import pytest
import torch

from nf4lib.backends.cpu import hugepages as _hugepages


def _vm_flags(address):
    """VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    lines = pathlib.Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux-only")
def test_large_cpu_buffers_are_advised_for_huge_pages():
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    out = _hugepages.empty_large(16 << 20, torch.bfloat16, "cpu")  # 32 MiB
    assert out.shape == (16 << 20,) and out.dtype == torch.bfloat16
    assert "hg" in _vm_flags(out.data_ptr() + (out.numel() * 2) // 2)


def test_small_meta_and_unavailable_fall_back_to_torch_empty(monkeypatch):
    small = _hugepages.empty_large(1000, torch.float32, "cpu")
    assert small.shape == (1000,) and small.dtype == torch.float32
    meta = _hugepages.empty_large(16 << 20, torch.float16, "meta")
    assert meta.device.type == "meta" and meta.shape == (16 << 20,)
    monkeypatch.setattr(_hugepages, "_madvise", False)  # as on a system without madvise
    out = _hugepages.empty_large(16 << 20, torch.float32, "cpu")
    out.fill_(1.5)
    assert out.shape == (16 << 20,) and bool((out == 1.5).all())


# --- the two-thread split of large CPU dequantizes (nf4lib.backends.cpu.halves) ---

import multiprocessing  # noqa: E402

import nf4lib  # noqa: E402
from nf4lib.backends.cpu import halves as _halves, native as _native  # noqa: E402
from nf4lib.backends.cpu import eager as _quant  # noqa: E402


@pytest.fixture(autouse=True)
def _pure_kernels():
    with _native.disabled():
        yield


def _dequantize_unsplit(q, dtype=None):
    old = _quant._SPLIT_MIN
    _quant._SPLIT_MIN = 1 << 62
    try:
        return nf4lib.dequantize(q, dtype)
    finally:
        _quant._SPLIT_MIN = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_split_dequantize_equals_one_thread(monkeypatch, dtype, double_quant):
    x = torch.randn(1000, 333, dtype=dtype)  # odd size: a partial last block and uneven halves
    q = nf4lib.quantize(x, blocksize=64, double_quant=double_quant)
    expected = _dequantize_unsplit(q)
    monkeypatch.setattr(_quant, "_SPLIT_MIN", 1024)
    monkeypatch.setattr(_quant, "_DEQUANT_CHUNK", 4096)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # split even on a 1-thread runner
    calls = []
    real = _halves.run_halves
    monkeypatch.setattr(_quant, "run_halves", lambda *a: calls.append(a[1:]) or real(*a))
    assert torch.equal(nf4lib.dequantize(q), expected)
    assert calls, "the split path was not taken"


def test_split_dequantize_under_inference_mode_and_no_grad(monkeypatch):
    monkeypatch.setattr(_quant, "_SPLIT_MIN", 1024)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    q = nf4lib.quantize(torch.randn(256, 256))
    expected = _dequantize_unsplit(q)
    with torch.inference_mode():
        out = nf4lib.dequantize(q)
    assert out.is_inference() and torch.equal(out, expected)
    with torch.no_grad():
        assert torch.equal(nf4lib.dequantize(q), expected)


def test_run_halves_covers_the_range_once_and_raises_either_half():
    seen = []
    _halves.run_halves(lambda lo, hi: seen.append((lo, hi)), 0, 1000, 64)
    assert sorted(seen) == [(0, 448), (448, 1000)]

    def fail_second(lo, hi):
        if lo:
            raise ValueError("second half failed")

    with pytest.raises(ValueError, match="second half"):
        _halves.run_halves(fail_second, 0, 1000, 64)
    done = []

    def fail_first(lo, hi):
        if not lo:
            raise ValueError("first half failed")
        done.append(hi)

    with pytest.raises(ValueError, match="first half"):
        _halves.run_halves(fail_first, 0, 1000, 64)
    assert done == [1000]  # the helper had finished before the error came back


def _child_dequantizes(q, expected, conn):
    conn.send(bool(torch.equal(nf4lib.dequantize(q), expected)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_split_dequantize_in_a_forked_child(monkeypatch):
    """A DataLoader-style forked worker gets its own helper thread instead of a dead one."""
    monkeypatch.setattr(_quant, "_SPLIT_MIN", 1024)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    q = nf4lib.quantize(torch.randn(128, 128))
    expected = _dequantize_unsplit(q)
    assert torch.equal(nf4lib.dequantize(q), expected)  # the parent's helper thread exists now
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_dequantizes, args=(q, expected, child))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and parent.recv() is True
