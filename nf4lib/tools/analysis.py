"""Error analysis. Where does 4-bit error come from, per tensor, per layer, per codebook?

Pure functions returning plain data: a metrics ``dict``, or a list of records (dicts)
that :func:`to_dataframe` turns into a pandas DataFrame when pandas is installed.

Metrics between a tensor ``x`` and its reconstruction ``x_hat``, ``e = x_hat - x``,
accumulated in float64:

    mse = mean(e^2)            mae = mean(|e|)          max_abs = max(|e|)
    rel_l2 = ||e|| / ||x||     sqnr_db = 10 log10(||x||^2 / ||e||^2)
    cosine = <x, x_hat> / (||x|| ||x_hat||)

Settings are nf4lib's own (:class:`Setting`: a codebook, double quantization, a scale rule)
and the affine INT4 baselines other libraries define (:class:`~nf4lib.tools.baselines.Affine`:
torchao's min/max, HQQ), each with its exact stored bits per parameter, so that any comparison
can be made at matched bits. Names parse: ``"nf4"``, ``"nf4+dq"``, ``"nf4-mse"``, ``"fp4"``,
``"int4-symmetric"`` (absmax INT4, 15 levels: nf4lib's ``int4`` codebook), ``"int4-affine"``
(torchao), ``"int4-hqq"`` (hqq).

Example:
    >>> from nf4lib import analysis
    >>> recs = analysis.compare_codebooks(torch.randn(1024, 1024), ["nf4", "int4-affine"])
    >>> [(r["setting"], r["bits_per_param"], round(r["sqnr_db"], 1)) for r in recs]
    [('nf4', 4.5, 20.7), ('int4-affine', 4.5, 20.2)]
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..core.codebooks import normal_float_levels
from ..weight.linear import linear_weight
from ..transforms.plan import DEFAULT_EXCLUDE, plan_modules
from ..core.checks import check_blocksize
from ..ops.quantize import bits_per_parameter, dequantize, quantize
from .baselines import Affine

__all__ = [
    "Setting",
    "Affine",
    "DEFAULT_SETTINGS",
    "default_settings",
    "parse_settings",
    "excess_kurtosis",
    "error_metrics",
    "compare_codebooks",
    "compare_tensors",
    "compare_model",
    "linear_weights",
    "summarize",
    "to_dataframe",
]

_CHUNK = 1 << 22  # elements per float64 chunk: bounded extra memory for any tensor size


class Setting(NamedTuple):
    """One way to quantize: a label, a codebook (``"nf4"``, ``"fp4"``, ``"int4"``,
    ``"nf4-symmetric"`` or a tensor), double quantization, and the block scale
    (``"absmax"``, or ``"mse"``: searched to lower the error, see ``quantize``)."""

    name: str
    code: object = "nf4"
    double_quant: bool = False
    scale: str = "absmax"

    def levels(self):
        """The ``code`` to pass to :func:`nf4lib.quantize`. ``"nf4-symmetric"`` is
        resolved here, on use, so importing this module does not import scipy."""
        if isinstance(self.code, str) and self.code == "nf4-symmetric":
            return normal_float_levels(4, symmetric=True)
        return self.code

    def missing(self) -> Optional[str]:
        """Always ``None``: nf4lib's own settings run everywhere (see :meth:`Affine.missing`)."""
        return None

    def reconstruct(self, x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, float]:
        """``(dequantize(quantize(x)) as float32, bits_per_parameter)`` for this setting."""
        q = quantize(x, blocksize=blocksize, code=self.levels(), double_quant=self.double_quant, scale=self.scale)
        return dequantize(q, torch.float32), bits_per_parameter(q)


DEFAULT_SETTINGS = (
    Setting("nf4"),
    Setting("nf4+dq", "nf4", True),
    # absmax INT4 with 15 evenly spaced levels: the weakest INT4, kept and labelled as such
    Setting("int4-symmetric", "int4"),
    Setting("fp4", "fp4"),
    # The textbook quantiles Phi^-1((2i+1)/32), no exact zero (QLoRA's table has one).
    Setting("nf4-symmetric", "nf4-symmetric"),
    # the same bytes layout, each block's scale searched to lower its squared error
    Setting("nf4-mse", "nf4", scale="mse"),
)



class _Sums(NamedTuple):
    n: int
    sq_ref: float
    sq_hat: float
    sq_err: float
    abs_err: float
    dot: float
    max_abs: float


def _sums(x: torch.Tensor, x_hat: torch.Tensor) -> _Sums:
    a, b = x.detach().reshape(-1), x_hat.detach().reshape(-1)
    sq_ref = sq_hat = sq_err = abs_err = dot = 0.0
    max_abs = 0.0
    for s in range(0, a.numel(), _CHUNK):
        xa, xb = a[s : s + _CHUNK].double(), b[s : s + _CHUNK].double()
        e = xb - xa
        sq_ref += float(xa.square().sum())
        sq_hat += float(xb.square().sum())
        sq_err += float(e.square().sum())
        abs_err += float(e.abs().sum())
        dot += float((xa * xb).sum())
        max_abs = max(max_abs, float(e.abs().max()))
    return _Sums(a.numel(), sq_ref, sq_hat, sq_err, abs_err, dot, max_abs)


def _metrics(s: _Sums) -> dict:
    n = max(s.n, 1)
    return {
        "mse": s.sq_err / n,
        "mae": s.abs_err / n,
        "rel_l2": math.sqrt(s.sq_err / s.sq_ref) if s.sq_ref > 0 else (0.0 if s.sq_err == 0 else math.inf),
        "sqnr_db": 10 * math.log10(s.sq_ref / s.sq_err) if s.sq_err > 0 and s.sq_ref > 0 else (math.inf if s.sq_err == 0 else -math.inf),
        "max_abs": s.max_abs,
        "cosine": s.dot / math.sqrt(s.sq_ref * s.sq_hat) if s.sq_ref > 0 and s.sq_hat > 0 else (1.0 if s.sq_err == 0 else 0.0),
        "ref_norm": math.sqrt(s.sq_ref),
        "quant_norm": math.sqrt(s.sq_hat),
    }


def error_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Error of ``x_hat`` against ``x``: mse, mae, rel_l2, sqnr_db, max_abs, cosine (floats).

    Also ``ref_norm`` and ``quant_norm`` (``||x||``, ``||x_hat||``), which let
    :func:`summarize` combine layers exactly.

    Args:
        x: the original float tensor, any shape.
        x_hat: a float tensor of the same shape, or a :class:`QuantizedTensor` of ``x``.
    """
    from ..core.records import QuantizedTensor

    if isinstance(x_hat, QuantizedTensor):
        x_hat = dequantize(x_hat, torch.float32)
    for name, t in (("x", x), ("x_hat", x_hat)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if x.shape != x_hat.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has shape {tuple(x_hat.shape)}")
    for name, t in (("x", x), ("x_hat", x_hat)):
        if not bool(torch.isfinite(t).all()):
            # NaN would vanish from max_abs (a max ignores it) and poison the sums: say so instead
            raise ValueError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s); error metrics need finite tensors")
    return _metrics(_sums(x, x_hat))


_AFFINE_NAMES = {"int4-affine": "minmax", "int4-hqq": "hqq"}


def default_settings() -> tuple:
    """:data:`DEFAULT_SETTINGS` plus affine INT4 (``"int4-affine"``) when torchao is installed:
    the comparison at matched bits (both 4 + 32/blocksize bits per parameter)."""
    affine = Affine("int4-affine")
    return DEFAULT_SETTINGS + ((affine,) if affine.missing() is None else ())


def parse_settings(settings) -> tuple:
    """``Setting`` / ``Affine`` records from records or names (``"nf4"``, ``"nf4+dq"``,
    ``"nf4-mse"``, ``"int4-mse+dq"``, ``"int4-symmetric"``, ``"int4-affine"``, ``"int4-hqq"``, ...)."""
    if isinstance(settings, (str, Setting, Affine)):
        raise TypeError(f"settings must be a sequence of settings, got the single setting {settings!r}: wrap it in a list")
    out = []
    for s in settings:
        if isinstance(s, str) and s in _AFFINE_NAMES:
            s = Affine(s, _AFFINE_NAMES[s])
        elif isinstance(s, str):  # "nf4", "nf4+dq", "int4-mse", "nf4-mse+dq", "int4-symmetric", ...
            base = s.split("+")[0]
            mse = base.endswith("-mse")
            base = base[:-4] if mse else base
            s = Setting(s, "int4" if base == "int4-symmetric" else base, s.endswith("+dq"), "mse" if mse else "absmax")
        if not isinstance(s, (Setting, Affine)):
            raise TypeError(f"settings must be Setting / Affine records or names like 'nf4', 'nf4+dq', "
                            f"'int4-affine', got {s!r}")
        out.append(s)
    return tuple(out)


def _available(settings) -> tuple:
    """The settings that can run here; a note (a warning) for each one that cannot."""
    out = []
    for s in parse_settings(default_settings() if settings is None else settings):
        why = s.missing()
        if why is None:
            out.append(s)
        else:
            warnings.warn(f"analysis: skipping {s.name}: {why}", stacklevel=3)
    return tuple(out)


def excess_kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis ``E[(x - mean)^4] / var^2 - 3`` of all of ``x`` (0 for a normal
    distribution; large for heavy tails), accumulated in float64."""
    a = x.detach().reshape(-1)
    n = max(a.numel(), 1)
    mean = sum(float(a[s : s + _CHUNK].double().sum()) for s in range(0, a.numel(), _CHUNK)) / n
    m2 = m4 = 0.0
    for s in range(0, a.numel(), _CHUNK):
        d = a[s : s + _CHUNK].double() - mean
        d2 = d.square()
        m2 += float(d2.sum())
        m4 += float(d2.square().sum())
    m2, m4 = m2 / n, m4 / n
    return m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0


def reconstructions(x: torch.Tensor, settings: Optional[Sequence] = None, blocksizes: Sequence[int] = (64,)):
    """Yield ``(setting, blocksize, x_hat, bits_per_param)`` for every setting that can run
    here (:func:`compare_codebooks`'s loop, for callers that measure something else)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    settings = _available(settings)
    for bs in blocksizes:
        check_blocksize(bs)
    for bs in blocksizes:
        for s in settings:
            x_hat, bits = s.reconstruct(x, bs)
            yield s, bs, x_hat, bits


def compare_codebooks(
    x: torch.Tensor, settings: Optional[Sequence] = None, blocksizes: Sequence[int] = (64,)
) -> list[dict]:
    """Quantize ``x`` every way in ``settings`` x ``blocksizes``; one record per pair.

    Args:
        x: a floating point tensor.
        settings: records or names (see :func:`parse_settings`); ``None``:
            :func:`default_settings`. A baseline whose library is missing is skipped with a
            warning, never an error.
        blocksizes: block (group) sizes, powers of two.

    Returns:
        ``[{"setting", "blocksize", "double_quant", "bits_per_param", "numel", <metrics>}, ...]``
    """
    records = []
    for s, bs, x_hat, bits in reconstructions(x, settings, blocksizes):
        rec = {"setting": s.name, "blocksize": bs, "double_quant": bool(getattr(s, "double_quant", False)),
               "bits_per_param": bits, "numel": x.numel()}
        rec.update(error_metrics(x, x_hat))
        records.append(rec)
    return records


def compare_tensors(
    named: Iterable[tuple[str, torch.Tensor]], settings: Optional[Sequence] = None, blocksizes: Sequence[int] = (64,)
) -> list[dict]:
    """:func:`compare_codebooks` over ``(name, tensor)`` pairs, one at a time (a generator
    of tensors read from disk keeps memory at one tensor). Records gain ``layer``,
    ``shape``, ``dtype`` and the tensor's ``kurtosis`` (:func:`excess_kurtosis`)."""
    settings = _available(settings)
    records = []
    for name, t in named:
        head = {"layer": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                "kurtosis": excess_kurtosis(t)}
        for rec in compare_codebooks(t, settings, blocksizes):
            records.append({**head, **rec})
    return records


def linear_weights(model: nn.Module, exclude=DEFAULT_EXCLUDE) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every full-precision linear layer that :func:`nf4lib.convert`
    would convert (the same plan: ``exclude`` rules, tied heads kept; a weight shared by
    several layers listed once). The weight is ``(out_features, in_features)``: a
    ``Conv1D``'s is transposed, as it is quantized."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    candidates = plan_modules(model, exclude).layers
    out, seen = [], set()
    for name, m in candidates.values():
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((name, linear_weight(m)))
    return out


def compare_model(
    model: nn.Module, settings: Optional[Sequence] = None, blocksizes: Sequence[int] = (64,), *, exclude=DEFAULT_EXCLUDE
) -> list[dict]:
    """One record per (linear layer, setting, blocksize). The model is not modified.

    Raises:
        ValueError: the model has no full-precision linear layer to compare (it is
            converted already, or ``exclude`` leaves none): an empty list would read as
            "no error"."""
    weights = linear_weights(model, exclude)
    if not weights:
        n4 = sum(1 for m in model.modules() if type(m).__name__ == "NF4Linear")
        why = f"its {n4} linear layers are NF4 already: compare the full-precision model" if n4 else \
            f"it has no nn.Linear or Conv1D outside exclude={exclude!r}"
        raise ValueError(f"compare_model: nothing to compare in this {type(model).__name__}: {why}")
    return compare_tensors(weights, settings, blocksizes)


def summarize(records: Iterable[dict], by: Sequence[str] = ("setting", "blocksize")) -> list[dict]:
    """Combine per-layer records into one per ``by`` group, exactly (as if every layer's
    weights were one vector): mse, mae, rel_l2, sqnr_db, cosine from the sums, max_abs as
    the max, bits_per_param weighted by numel."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, rs in groups.items():
        n = sum(r["numel"] for r in rs)
        sq_ref = sum(r["ref_norm"] ** 2 for r in rs)
        sq_hat = sum(r["quant_norm"] ** 2 for r in rs)
        sq_err = sum(r["mse"] * r["numel"] for r in rs)
        s = _Sums(n, sq_ref, sq_hat, sq_err, sum(r["mae"] * r["numel"] for r in rs),
                  (sq_ref + sq_hat - sq_err) / 2, max(r["max_abs"] for r in rs))  # <x,y> = (|x|^2+|y|^2-|x-y|^2)/2
        rec = dict(zip(by, key))
        rec.update(layers=len(rs), numel=n, bits_per_param=sum(r["bits_per_param"] * r["numel"] for r in rs) / max(n, 1))
        rec.update(_metrics(s))
        out.append(rec)
    return out


def to_dataframe(records: Iterable[dict]):
    """The records as a pandas DataFrame (pandas is optional: ImportError names it)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("to_dataframe needs pandas (pip install pandas); the records are plain dicts without it") from None
    return pd.DataFrame(list(records))

