"""nf4lib: functional 4-bit NormalFloat (NF4) quantization on PyTorch primitives.

Without torch loaded, ``import nf4lib`` is cheap: the library (and torch with it) loads on
the first use of any name below, so ``nf4lib --help`` answers without importing torch.
With torch already loaded (a program that imported torch first) it loads at once, as any
library would: NF4 weights are then allowed to ``torch.load(weights_only=True)`` from the
start. Importing a submodule (``nf4lib.hf``, ``nf4lib.distributed``) loads what it needs.
"""

import importlib
import sys

__version__ = "0.1.0"

__all__ = [
    "nf4_levels",
    "normal_float_levels",
    "fp4_levels",
    "int4_levels",
    "dynamic_map",
    "QuantizedTensor",
    "DoubleQuantized",
    "quantize",
    "dequantize",
    "double_quantize",
    "double_dequantize",
    "bits_per_parameter",
    "quantized_linear",
    "NF4Tensor",
    "NF4Linear",
    "convert",
    "dequantize_model",
    "from_bnb",
    "to_bnb",
    "save_quantized",
    "load_quantized",
    "analysis",
]


def _load() -> None:
    """Import the library and bind its public names here (once)."""
    from . import _api

    g = globals()
    for name in __all__:
        g[name] = getattr(_api, name)


def __getattr__(name: str):
    if name in __all__:
        _load()
        return globals()[name]
    if name in ("hf", "distributed", "backends"):  # submodules, as attributes too
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nf4lib' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if "torch" in sys.modules:  # nothing to save by waiting
    _load()
