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

# public name -> the private module that defines it (None: the name is a submodule)
_HOME = {
    "nf4_levels": "_codebooks",
    "normal_float_levels": "_codebooks",
    "fp4_levels": "_codebooks",
    "int4_levels": "_codebooks",
    "dynamic_map": "_double",
    "QuantizedTensor": "_records",
    "DoubleQuantized": "_records",
    "quantize": "_quant",
    "dequantize": "_quant",
    "double_quantize": "_double",
    "double_dequantize": "_double",
    "bits_per_parameter": "_quant",
    "quantized_linear": "_ops",
    "fake_quantize": "_fake",
    "block_absmax": "_fake",
    "NF4Tensor": "_tensor",
    "NF4Linear": "_linear",
    "convert": "_convert",
    "dequantize_model": "_convert",
    "prepare_qat": "_qat",
    "finalize_qat": "_qat",
    "QATLinear": "_qat",
    "loftq_init": "_loftq",
    "loftq_convert": "_loftq",
    "load_lora_factors": "_loftq",
    "from_bnb": "_interop",
    "to_bnb": "_interop",
    "save_quantized": "_checkpoint",
    "load_quantized": "_checkpoint",
    "analysis": None,
}
__all__ = list(_HOME)


def _load() -> None:
    """Import the library, register its kernels, and bind its public names here (once)."""
    from . import backends  # noqa: F401  (registers the device kernels)

    g = globals()
    for name, home in _HOME.items():
        module = importlib.import_module(f".{home or name}", __name__)
        g[name] = module if home is None else getattr(module, name)


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
