"""Build script: metadata lives in setup.cfg; this adds the optional native CPU kernels.

``nf4lib/backends/cpu/csrc/*.c`` is plain C11 (no Python or PyTorch headers) built into
``nf4lib/backends/cpu/_nf4cpu*.so`` and loaded with ctypes, so one build serves every PyTorch version.
It is optional: without a working C compiler the build prints a warning, the package
installs without it, and nf4lib runs its pure-PyTorch kernels.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildSharedLibrary(build_ext):
    """build_ext for a library that is not a Python extension module."""

    def get_export_symbols(self, ext):
        return []  # no PyInit_ function: the library is loaded with ctypes, never imported

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves the pure-PyTorch kernels
            print(f"warning: nf4lib's native CPU kernels were not built ({err}); nf4lib will use its pure-PyTorch kernels", file=sys.stderr)


# -ffp-contract=off: no fused multiply-add may change a rounding (the kernels must equal
# the pure-PyTorch ones bit for bit). SIMD code is enabled per function (target
# attributes) and chosen at run time, so the build needs no -march flag.
_CSRC = "nf4lib/backends/cpu/csrc"
_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fvisibility=hidden", "-pthread"]

setup(
    ext_modules=[
        Extension(
            "nf4lib.backends.cpu._nf4cpu",
            sources=[f"{_CSRC}/{name}.c" for name in ("nf4cpu_api", "nf4cpu_linear", "nf4cpu_scalar", "nf4cpu_avx2",
                                                       "nf4cpu_avx512", "nf4cpu_avx512bf16", "nf4cpu_amx", "nf4cpu_mse")],
            depends=[f"{_CSRC}/nf4cpu.h", f"{_CSRC}/nf4cpu_avx2.h"],
            extra_compile_args=_FLAGS,
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildSharedLibrary},
)
