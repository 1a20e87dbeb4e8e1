"""Calibrated conversion: GPTQ on the NF4 grid, layer by layer, checked on held-out data.

:func:`calibrate` runs the model on calibration batches and quantizes its linear layers with
:func:`~nf4lib.ops.gptq.gptq_quantize`, each layer seeing the outputs of the layers already
quantized before it (transformer blocks in order: the batches' inputs to the first block are
cached and pushed through each block twice, once to collect its layers' Hessians, once with
its quantized layers to make the next block's inputs). Memory: one block's Hessians and one
set of cached block inputs.

GPTQ fits its calibration inputs; on inputs unlike them it can do worse than plain rounding.
So part of the batches is held out, and per layer the candidate with the lowest output
error on the held-out inputs is kept:

    gptq      gptq_quantize(W, H_calibration)
    rtn       quantize(W)                      (round to nearest, absmax scales)
    rtn-mse   quantize(W, scale="mse")         (searched scales, the same bytes)

    error(W_hat) = sum((X W^T - X W_hat^T)^2) = trace((W - W_hat) H_heldout (W - W_hat)^T)

Every candidate is an ordinary NF4 record in bitsandbytes' layout.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from torch import nn

from ..core.spec import QuantSpec, settings
from ..ops.gptq import gptq_quantize, layer_output_error
from ..ops.quantize import dequantize, quantize
from ..weight.linear import NF4Linear, check_compute_dtype, is_conv1d, linear_weight
from .plan import DEFAULT_EXCLUDE, Exclude, plan_modules, progress_bar
from .tree import replace_modules, run_hooks

__all__ = ["calibrate", "Calibration", "text_batches", "default_text"]


class Calibration(NamedTuple):
    """What :func:`calibrate` returns.

    Attributes:
        model: the new model (NF4Linear layers; the input model is not modified).
        layers: one dict per quantized layer: ``layer``, ``choice`` (``"gptq"``, ``"rtn"`` or
            ``"rtn-mse"``), ``damp`` (GPTQ's, when chosen), ``heldout`` (each candidate's output error on
            the held-out part, relative to ``rtn``'s; ``None`` without one), ``calibration`` (the same on
            the calibration part, measured only when nothing is held out), and ``rows`` (calibration
            input rows seen).
    """

    model: nn.Module
    layers: list


class _Stop(Exception):
    pass


def default_text() -> str:
    """The calibration text shipped with nf4lib: ~1,600 words of varied English prose
    (narrative, dialogue, instructions, science, news), written for nf4lib."""
    return (pathlib.Path(__file__).resolve().parents[1] / "data" / "calibration.txt").read_text(encoding="utf-8")


def text_batches(tokenizer, text: Optional[str] = None, *, max_length: int = 128) -> list:
    """Calibration batches from text: one batch per paragraph (blank-line separated), each
    ``tokenizer(paragraph, truncation=True, max_length=max_length, return_tensors="pt")``, so no
    padding enters the Hessians. ``text=None``: :func:`default_text`.

    Example:
        >>> batches = text_batches(AutoTokenizer.from_pretrained(path), open("corpus.txt").read())
    """
    text = default_text() if text is None else text
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError("the calibration text is empty: give at least one paragraph")
    return [dict(tokenizer(p, truncation=True, max_length=max_length, return_tensors="pt")) for p in paragraphs]


def _call(model, batch, forward):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _set_main(args: list, kwargs: dict, value) -> None:
    """Replace a block's main input (its first positional argument, or ``hidden_states``)."""
    if args:
        args[0] = value
    elif "hidden_states" in kwargs:
        kwargs["hidden_states"] = value
    else:
        raise ValueError("calibrate: cannot tell which argument of the model's blocks is the hidden state "
                         "(neither a positional argument nor hidden_states=)")


def _blocks(model: nn.Module, layer_ids: set) -> Optional[nn.ModuleList]:
    """The model's sequence of blocks: the ModuleList holding the most layers to quantize."""
    best, count = None, 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(1 for c in m.modules() if id(c) in layer_ids)
            if n > count:
                best, count = m, n
    return best


class _Part:
    """One part of the data (calibration or held out) as one layer saw it: ``X^T X`` (float64,
    when needed) and, while there are no more rows than inputs, the rows themselves, since
    ``||E X^T||^2`` then costs less than ``trace(E H E^T)``."""

    def __init__(self, need_h: bool):
        self.need_h, self.h, self.rows, self.n = need_h, None, [], 0

    def add(self, flat: torch.Tensor, cache: list) -> None:
        self.n += flat.shape[0]
        if self.rows is not None:
            self.rows.append(flat)
            if self.n > flat.shape[1]:  # more rows than inputs: the Hessian is the cheaper form
                if not self.need_h:
                    self.h = sum((r.t() @ r).double() for r in self.rows)
                self.rows = None
                self.need_h = True
                return
        if self.need_h:
            if cache[2] is None:
                cache[2] = (flat.t() @ flat).double()  # float32 per batch, summed in float64
            self.h = cache[2].clone() if self.h is None else self.h.add_(cache[2])

    def error(self, w: torch.Tensor, w_hat: torch.Tensor) -> float:
        """``sum((X W^T - X W_hat^T)^2)`` over this part's rows (float32: for comparisons)."""
        e = (w.float() - w_hat.float())
        if self.rows is not None:
            return float(sum(float((r @ e.t()).square().sum(dtype=torch.float64)) for r in self.rows))
        return layer_output_error(w, w_hat, self.h, dtype=torch.float32)


class _Hessians:
    """Forward pre-hooks adding each layer's inputs to its calibration or held-out :class:`_Part`."""

    def __init__(self, layers: dict):
        self.cal = {k: _Part(need_h=True) for k in layers}
        self.held = {k: _Part(need_h=False) for k in layers}
        self.heldout = False
        self._last = None
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in layers.items()]

    def _hook(self, key):
        def add(module, args):
            x = args[0]
            if self._last is None or self._last[0] is not x:  # q, k, v (gate, up) share one input: one product
                flat = x.detach().reshape(-1, x.shape[-1]).float().clone()  # kept: never a view of an activation
                if not bool(torch.isfinite(flat).all()):
                    raise ValueError(f"calibration inputs hold {int((~torch.isfinite(flat)).sum())} NaN/Inf value(s)")
                self._last = [x, flat, None]
            (self.held if self.heldout else self.cal)[key].add(self._last[1], self._last)
        return add

    def remove(self):
        for h in self.handles:
            h.remove()


def _choose(w, cal_part, held_part, spec, damps, gptq_kw) -> tuple:
    """(record, choice, damp or None, errors on the calibration part, on the held-out part)."""
    plain = dataclasses.replace(spec, scale="absmax")
    cands = {"rtn": quantize(w, spec=plain), "rtn-mse": quantize(w, spec=dataclasses.replace(spec, scale="mse"))}
    if w.shape[1] % spec.blocksize == 0:
        for d in damps:
            cands[("gptq", d)] = gptq_quantize(w, cal_part.h, spec=spec, damp=d, **gptq_kw)
    w_hats = {k: dequantize(q, torch.float32) for k, q in cands.items()}
    held = {k: held_part.error(w, v) for k, v in w_hats.items()} if held_part.n else None
    # on the calibration part only without a held-out part (to choose among the RTN candidates):
    # at 1B scale these products cost as much as GPTQ itself, and GPTQ wins there by construction
    cal = {k: cal_part.error(w, v) for k, v in w_hats.items()} if held is None else None
    gptqs = [k for k in cands if isinstance(k, tuple)]
    if held is None:
        # nothing held out: nothing to check GPTQ against (the first damping given)
        choice = gptqs[0] if gptqs else min(cal, key=lambda k: (cal[k], k != "rtn"))
    else:
        choice = min(held, key=lambda k: (held[k], k != "rtn"))  # a tie keeps plain rounding
    best = min(gptqs, key=lambda k: (held or cal)[k]) if gptqs else None

    def rel(d):  # the best GPTQ damping's error stands for "gptq"
        if d is None:
            return None
        keep = {k: v for k, v in d.items() if not isinstance(k, tuple)}
        if best is not None:
            keep["gptq"] = d[best]
        return {k: v / keep["rtn"] if keep["rtn"] > 0 else 1.0 for k, v in keep.items()}

    damp = choice[1] if isinstance(choice, tuple) else None
    name = "gptq" if isinstance(choice, tuple) else choice
    return cands[choice], name, damp, rel(cal), rel(held)


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    spec: Optional[QuantSpec] = None,
    blocksize: int = 64,
    code="nf4",
    double_quant: bool = False,
    scale: str = "absmax",
    exclude: Exclude = DEFAULT_EXCLUDE,
    damp=0.1,
    act_order: bool = False,
    block_columns: int = 128,
    holdout: float = 0.25,
    forward: Optional[Callable] = None,
    compute_dtype: Optional[torch.dtype] = None,
    progress: Optional[bool] = None,
) -> Calibration:
    """Convert ``model`` to NF4 with GPTQ, layer by layer, keeping GPTQ only where it helps.

    Args:
        model: a full-precision model (Llama-style and BERT-style transformers, or any module).
            Not modified.
        batches: calibration inputs, each a dict (``model(**batch)``), a tuple (``model(*batch)``)
            or a tensor (``model(batch)``); or see ``forward``. At least one; with two or more, the
            last ``holdout`` fraction (at least one batch) is held out.
        spec, blocksize, code, double_quant, scale: the settings, as in :func:`nf4lib.convert`.
        exclude: the layers to leave in full precision, as in :func:`nf4lib.convert`.
        damp: GPTQ's damping (a fraction of the Hessian's mean diagonal), or several to try per
            layer, the held-out part choosing. The default, 0.1, is ten times the paper's 1%: with
            a few thousand calibration tokens, or calibration text unlike the data the model will
            see, 1% fits the calibration data too closely (see ``notebooks/04_gptq_nf4_minilm.ipynb``).
        act_order, block_columns: GPTQ's options (:func:`~nf4lib.ops.gptq.gptq_quantize`).
        holdout: the fraction of batches held out to check each layer's choice; ``0``: GPTQ everywhere.
        forward: ``forward(model, batch)`` to run a batch another way (e.g. a sentence-transformers model).
        compute_dtype: the NF4 layers' compute dtype, as in :func:`nf4lib.convert`.
        progress: a tqdm bar over the blocks; ``None``: on a terminal.

    Returns:
        A :class:`Calibration`: the new model, and per layer the choice and the errors.

    Raises:
        ValueError: no batches; NaN/Inf calibration inputs; a bad setting.

    Example:
        >>> batches = [tokenizer(t, return_tensors="pt") for t in texts]
        >>> qmodel, report = nf4lib.gptq.calibrate(model, batches)
        >>> sum(r["choice"] == "gptq" for r in report), len(report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate expects an nn.Module, got {type(model).__name__}")
    spec = settings(spec, "calibrate", blocksize=blocksize, code=code, double_quant=double_quant, scale=scale)
    check_compute_dtype(compute_dtype)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one calibration batch; got none")
    n_held = 0 if holdout == 0 or len(batches) < 2 else max(1, round(len(batches) * holdout))
    cal_n = len(batches) - n_held
    damps = tuple(damp) if isinstance(damp, (tuple, list)) else (damp,)
    if not damps:
        raise ValueError("damp must be a number or a non-empty sequence of numbers")
    gptq_kw = dict(act_order=act_order, block_columns=block_columns)

    candidates = plan_modules(model, exclude).layers  # id -> (name, module), in model order
    work = replace_modules(model, {})  # new module objects over shared tensors: swapped into, never written
    names = {name for name, _ in candidates.values()}
    layers = {name: m for name, m in work.named_modules(remove_duplicate=False) if name in names}
    order = [name for name, _ in candidates.values() if name in layers]
    blocks = _blocks(work, {id(m) for m in layers.values()})
    staged = []
    if blocks is not None:
        in_block = {id(c) for c in blocks.modules()}
        for block in blocks:
            ids = {id(c) for c in block.modules()}
            staged.append((block, [n for n in order if id(layers[n]) in ids]))
        rest = [n for n in order if id(layers[n]) not in in_block]
    else:
        rest = order
    records, report = {}, []

    def quantize_stage(names_here, hess):
        for name in names_here:
            m = layers[name]
            w = linear_weight(m)
            part = hess.cal[name]
            if part.n == 0:
                raise ValueError(f"layer {name!r} saw no calibration input; exclude it or calibrate on inputs that reach it")
            q, choice, d, cal, held = _choose(w, part, hess.held[name], spec, damps, gptq_kw)
            records[name] = q
            report.append({"layer": name, "choice": choice, "damp": d, "calibration": cal, "heldout": held,
                           "rows": part.n})
            dense = dequantize(q, torch.float32).to(m.weight.dtype)  # later layers see this layer quantized
            m.weight = nn.Parameter(dense.t().contiguous() if is_conv1d(m) else dense, requires_grad=False)

    def run_model(names_here, first_block=None):
        """The model on every batch (up to the first block, if given), collecting Hessians;
        returns them and, with ``first_block``, the block's inputs per batch."""
        hess, inputs = _Hessians({n: layers[n] for n in names_here}), []

        def grab(module, args, kwargs):
            inputs.append((list(args), dict(kwargs)))
            raise _Stop

        h = first_block.register_forward_pre_hook(grab, with_kwargs=True) if first_block is not None else None
        try:
            for i, b in enumerate(batches):
                hess.heldout = i >= cal_n
                try:
                    _call(work, b, forward)
                except _Stop:
                    pass
        finally:
            hess.remove()
            if h is not None:
                h.remove()
        if first_block is not None and len(inputs) != len(batches):
            raise ValueError("calibrate: the model's first block did not run on every batch")
        return hess, inputs

    with torch.no_grad(), progress_bar(range(len(staged) + 2), total=len(staged) + 2, desc="nf4lib.calibrate",
                                       unit="stage", show=progress) as bar:
        inputs, after = [], rest
        for k in bar:
            if k == 0 and staged:  # the layers that run before the first block (their Hessians seen on the way)
                hess, inputs = run_model(rest, staged[0][0])
                before = [n for n in rest if hess.cal[n].n]
                after = [n for n in rest if n not in before]
                if before:
                    quantize_stage(before, hess)
                    _, inputs = run_model([], staged[0][0])  # the first block's inputs, after those layers
            elif 0 < k <= len(staged):
                block, names_here = staged[k - 1]
                hess = _Hessians({n: layers[n] for n in names_here})
                try:
                    for i, (args, kwargs) in enumerate(inputs):
                        hess.heldout = i >= cal_n
                        block(*args, **kwargs)
                finally:
                    hess.remove()
                quantize_stage(names_here, hess)
                for args, kwargs in inputs:  # the next block's inputs, from the quantized block
                    out = block(*args, **kwargs)
                    _set_main(args, kwargs, out[0] if isinstance(out, (tuple, list)) else out)
            elif k == len(staged) + 1 and after:  # the layers after the blocks (or all, without blocks)
                hess, _ = run_model(after)
                quantize_stage(after, hess)

    converted = {}
    by_weight = {}
    for mid, (name, lin) in candidates.items():
        if name not in records:
            continue
        twin = by_weight.get(id(lin.weight))
        layer = NF4Linear.from_quantized(records[name], lin.bias, compute_dtype=compute_dtype)
        if twin is not None:
            layer.weight = twin.weight
        by_weight.setdefault(id(lin.weight), layer)
        converted[mid] = layer
    if id(model) in converted:
        return Calibration(converted[id(model)], report)
    return Calibration(run_hooks("quantized", replace_modules(model, converted)), report)
