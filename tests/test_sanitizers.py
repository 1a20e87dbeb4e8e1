"""The native library built with AddressSanitizer and UndefinedBehaviorSanitizer, running
the native-kernel and security tests: any read past a buffer, or undefined behaviour such
as a shift by 64, aborts the run instead of passing unnoticed."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "nf4lib" / "backends" / "cpu" / "csrc").glob("*.c"))


def _runtime(name: str) -> str | None:
    out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.slow
@pytest.mark.security
def test_native_and_security_tests_pass_under_address_and_ub_sanitizers(tmp_path):
    if shutil.which("gcc") is None or not (_runtime("libasan.so") and _runtime("libubsan.so")):
        pytest.skip("gcc with the AddressSanitizer and UBSan runtimes is needed")
    lib = tmp_path / "_nf4cpu_sanitized.so"
    build = subprocess.run(
        ["gcc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
         "-std=c11", "-ffp-contract=off", "-fvisibility=hidden", "-pthread", "-shared", "-fPIC",
         *map(str, SOURCES), "-o", str(lib)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    env = dict(
        os.environ,
        LD_PRELOAD=f"{_runtime('libasan.so')} {_runtime('libubsan.so')}",
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",  # the interpreter's own allocations are not ours to judge
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        NF4LIB_NATIVE_LIB=str(lib),
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         # fork with live sanitizer threads can deadlock in the runtime itself, not in nf4lib
         "-k", "not forked_child",
         str(ROOT / "tests" / "test_native.py"), str(ROOT / "tests" / "test_security.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    tail = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in tail and "runtime error:" not in tail, tail
    # the sanitized library was the one in use
    probe = subprocess.run([sys.executable, "-c", "from nf4lib.backends.cpu import native as _native; print(_native._library_path(), _native.available())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.split() == [str(lib), "True"], probe.stdout + probe.stderr[-2000:]
