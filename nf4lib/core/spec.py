"""``QuantSpec``: the quantization settings, declared and validated once.

Every function that quantizes (``quantize``, ``convert``, ``NF4Linear``, ``NF4Config``,
``prepare_qat``, ``loftq_init``, ``loftq_convert``) takes ``spec=QuantSpec(...)``, or the
same four settings as keywords, which build one; either way the values are checked here
and nowhere else.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Union

import torch

from .checks import check_blocksize, check_flag, check_scale, transforms_active
from .codebooks import CODE_NAMES, code_name, resolve_code

__all__ = ["QuantSpec", "settings", "deprecated_keyword"]


@dataclasses.dataclass(frozen=True, eq=False)
class QuantSpec:
    """How to quantize: an immutable, validated set of the four settings.

    Attributes:
        blocksize: elements per scale block, a power of two in [16, 65536] (bitsandbytes
            reads 64..4096; 64 is its default and QLoRA's).
        code: ``"nf4"`` (QLoRA, arXiv 2305.14314), ``"fp4"``, ``"int4"``, or a sorted
            float tensor of at most 16 levels in [-1, 1] (kept as a float32 CPU copy).
        double_quant: also quantize the per-block scales to 8 bits (QLoRA's double
            quantization: 4.127 instead of 4.5 bits per parameter at blocksize 64).
        scale: ``"absmax"`` (each block's absolute maximum: bitsandbytes' bytes) or
            ``"mse"`` (each block's scale searched to lower its squared error).

    Raises:
        ValueError / TypeError: a setting out of range, naming it.

    Example:
        >>> spec = QuantSpec(blocksize=128, double_quant=True)
        >>> q = nf4lib.quantize(w, spec=spec)
        >>> qmodel = nf4lib.convert(model, spec=spec.replace(scale="mse"))
    """

    blocksize: int = 64
    code: Union[str, torch.Tensor] = "nf4"
    double_quant: bool = False
    scale: str = "absmax"

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize)
        code = self.code
        if isinstance(code, str):
            if code.lower() not in CODE_NAMES:
                raise ValueError(f"unknown code {code!r}; expected one of {CODE_NAMES} or a tensor")
            object.__setattr__(self, "code", code.lower())
        elif transforms_active():  # validating reads the values: trace the tensor as given
            object.__setattr__(self, "code", code.detach().to(torch.float32))
        else:
            object.__setattr__(self, "code", resolve_code(code))
        check_flag(self.double_quant, "double_quant")
        object.__setattr__(self, "scale", check_scale(self.scale))

    @property
    def code_name(self) -> str | None:
        """``"nf4"``, ``"fp4"`` or ``"int4"``, also for a tensor equal to one; None for others."""
        return self.code if isinstance(self.code, str) else code_name(self.code)

    @property
    def levels(self) -> torch.Tensor:
        """The codebook's float32 levels in storage order."""
        return resolve_code(self.code) if isinstance(self.code, str) else self.code

    def replace(self, **changes) -> "QuantSpec":
        """A new spec with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantSpec):
            return NotImplemented
        same_code = (self.code == other.code) if isinstance(self.code, str) and isinstance(other.code, str) else (
            not isinstance(self.code, str) and not isinstance(other.code, str) and torch.equal(self.code, other.code))
        return same_code and (self.blocksize, self.double_quant, self.scale) == (other.blocksize, other.double_quant, other.scale)

    def __hash__(self) -> int:
        code = self.code if isinstance(self.code, str) else tuple(self.code.tolist())
        return hash((self.blocksize, code, self.double_quant, self.scale))

    def __repr__(self) -> str:
        code = repr(self.code) if isinstance(self.code, str) else f"tensor({[round(v, 6) for v in self.code.tolist()]})"
        return f"QuantSpec(blocksize={self.blocksize}, code={code}, double_quant={self.double_quant}, scale={self.scale!r})"


_DEFAULTS = QuantSpec.__dataclass_fields__


def _is_default(name: str, value) -> bool:
    default = _DEFAULTS[name].default
    if isinstance(default, str):
        return isinstance(value, str) and value.lower() == default
    return type(value) is type(default) and value == default


def settings(spec, where: str, **given) -> QuantSpec:
    """The :class:`QuantSpec` a function was given: ``spec`` itself, or one built from the
    setting keywords in ``given`` (``blocksize``, ``code``, ``double_quant``, ``scale``).

    Raises:
        TypeError: ``spec`` is not a QuantSpec.
        ValueError: both ``spec`` and a setting keyword other than its default were given.
    """
    if spec is None:
        return QuantSpec(**given)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: spec must be a nf4lib.QuantSpec, got {type(spec).__name__}")
    clash = sorted(k for k, v in given.items() if not _is_default(k, v))
    if clash:
        raise ValueError(f"{where}: pass the settings either as spec= or as keywords, not both (got spec and {', '.join(clash)})")
    return spec


def deprecated_keyword(old: str, new: str, where: str, value, current):
    """``value`` given under a keyword's old name: warn, and return it as the new name's
    value (``current``, the new name's own value, must then be unset: None)."""
    if current is not None:
        raise ValueError(f"{where}: {old}= is the old name of {new}=; pass only {new}=")
    warnings.warn(f"{where}: {old}= is deprecated and will be removed in the next release; use {new}=",
                  DeprecationWarning, stacklevel=3)
    return value
