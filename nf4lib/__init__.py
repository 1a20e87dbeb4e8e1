"""nf4lib: functional 4-bit NormalFloat (NF4) quantization on PyTorch primitives.

Without torch loaded, ``import nf4lib`` is cheap: the library (and torch with it) loads on
the first use of any name below, so ``nf4lib --help`` answers without importing torch.
With torch already loaded (a program that imported torch first) it loads at once, as any
library would: NF4 weights are then allowed to ``torch.load(weights_only=True)`` from the
start. Importing a submodule (``nf4lib.hf``, ``nf4lib.distributed``, ``nf4lib.gptq``) loads what it needs.
"""

import importlib
import sys

__version__ = "0.1.0"

# public name -> the module that defines it (None: the name is a public submodule)
_HOME = {
    "nf4_levels": "core.codebooks",
    "normal_float_levels": "core.codebooks",
    "fp4_levels": "core.codebooks",
    "int4_levels": "core.codebooks",
    "dynamic_map": "core.double",
    "QuantSpec": "core.spec",
    "QuantizedTensor": "core.records",
    "DoubleQuantized": "core.records",
    "quantize": "ops.quantize",
    "dequantize": "ops.quantize",
    "double_quantize": "core.double",
    "double_dequantize": "core.double",
    "bits_per_parameter": "ops.quantize",
    "quantized_linear": "ops.linear",
    "fake_quantize": "ops.fake_quant",
    "block_absmax": "ops.fake_quant",
    "NF4Tensor": "weight.tensor",
    "NF4Linear": "weight.linear",
    "convert": "transforms.convert",
    "dequantize_model": "transforms.convert",
    "prepare_qat": "transforms.qat",
    "finalize_qat": "transforms.qat",
    "QATLinear": "transforms.qat",
    "loftq_init": "transforms.loftq",
    "loftq_convert": "transforms.loftq",
    "load_lora_factors": "transforms.loftq",
    "from_bnb": "formats.bnb",
    "to_bnb": "formats.bnb",
    "save_quantized": "formats.checkpoint",
    "load_quantized": "formats.checkpoint",
    "analysis": None,
    "gptq": None,
}
__all__ = list(_HOME)


def _load() -> None:
    """Import the library, register its kernels, and bind its public names here (once)."""
    from . import backends  # noqa: F401  (registers the device kernels)
    from .integrations import transformers_config  # noqa: F401  (the transforms' transformers hooks)

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
