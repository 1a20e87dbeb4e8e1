"""Error where it matters: in the layers' outputs and the model's, not only in the weights.

A weight error the inputs never excite costs nothing; one along the inputs' main directions costs
a lot. These functions measure each setting (nf4lib's and the affine INT4 baselines, see
:mod:`nf4lib.tools.analysis`) on real activations:

    per layer:   y = X W^T,  y_hat = X W_hat^T,  error_metrics(y, y_hat)   (X: the layer's inputs)
    per model:   a copy whose weights are W_hat (:func:`reconstructed_model`), compared downstream,
                 e.g. embedding cosine and :func:`neighbour_agreement`.

Example:
    >>> from nf4lib import analysis
    >>> recs = analysis.compare_outputs(model, lambda m: m.encode(sentences), ["nf4", "int4-affine"])
    >>> analysis.summarize(recs, by=("setting",))     # output SQNR over all layers, per setting
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..transforms.plan import DEFAULT_EXCLUDE, plan_modules
from ..transforms.tree import replace_modules
from ..weight.linear import is_conv1d, linear_weight
from .analysis import error_metrics, parse_settings, reconstructions

__all__ = ["layer_inputs", "compare_outputs", "reconstructed_model", "neighbour_agreement"]


def _layers(model: nn.Module, exclude) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    out, seen = [], set()
    for name, m in plan_modules(model, exclude).layers.values():
        if id(m) not in seen:
            seen.add(id(m))
            out.append((name, m))
    if not out:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D outside exclude={exclude!r} to measure")
    return out


def layer_inputs(
    model: nn.Module, run: Callable[[nn.Module], object], *, exclude=DEFAULT_EXCLUDE, max_rows: int = 4096
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The inputs each linear layer sees while ``run(model)`` runs (under ``torch.no_grad``).

    Args:
        model: the full-precision model (not modified).
        run: called once with ``model``; e.g. ``lambda m: m.encode(sentences)``.
        exclude: the layers to leave out, as in :func:`nf4lib.convert`.
        max_rows: keep at most this many input rows (tokens) per layer, the first ones seen.

    Returns:
        ``[(name, W, X), ...]`` in the model's order: ``W`` float32 ``(out, in)``, ``X``
        float32 ``(rows, in)``.
    """
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    layers = _layers(model, exclude)
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for _, m in layers}

    def grab(m, args):
        rows = seen[id(m)]
        have = sum(r.shape[0] for r in rows)
        if have < max_rows and args and isinstance(args[0], torch.Tensor):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            rows.append(x[: max_rows - have].float().clone())

    handles = [m.register_forward_pre_hook(grab) for _, m in layers]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, m in layers:
        if not seen[id(m)]:
            raise ValueError(f"layer {name!r} saw no input while run(model) ran; measure the layers the run uses "
                             f"(exclude the others)")
        out.append((name, linear_weight(m).float(), torch.cat(seen[id(m)])))
    return out


def compare_outputs(
    model: nn.Module,
    run: Callable[[nn.Module], object],
    settings: Optional[Sequence] = None,
    blocksizes: Sequence[int] = (64,),
    *,
    exclude=DEFAULT_EXCLUDE,
    max_rows: int = 4096,
) -> list[dict]:
    """Per layer, setting and blocksize: the error of the layer's output on its real inputs.

    ``y = X W^T`` against ``X W_hat^T`` (bias left out: it cancels), in float64, with ``X``
    from :func:`layer_inputs`. Records are :func:`~nf4lib.tools.analysis.compare_tensors`'
    (``layer``, ``setting``, ``blocksize``, ``bits_per_param``, ``numel`` = output elements,
    mse, rel_l2, sqnr_db, ...) plus ``weight_rel_l2``; :func:`~nf4lib.tools.analysis.summarize`
    combines them.
    """
    records = []
    for name, w, x in layer_inputs(model, run, exclude=exclude, max_rows=max_rows):
        y = x.double() @ w.double().t()
        for s, bs, w_hat, bits in reconstructions(w, settings, blocksizes):
            rec = {"layer": name, "setting": s.name, "blocksize": bs, "bits_per_param": bits, "numel": y.numel(),
                   "rows": x.shape[0], "weight_rel_l2": error_metrics(w, w_hat)["rel_l2"]}
            rec.update(error_metrics(y, x.double() @ w_hat.double().t()))
            records.append(rec)
    return records


def reconstructed_model(model: nn.Module, setting, *, blocksize: int = 64, exclude=DEFAULT_EXCLUDE) -> nn.Module:
    """A new model whose linear weights are ``setting``'s reconstructions, stored dense.

    Any setting (nf4lib's own or a baseline) runs through the same dense layers, so downstream
    comparisons differ only in the weights. For nf4lib's settings, :func:`nf4lib.convert`'s model
    computes with these same weight values. A tree transform: ``model`` is not modified, the
    other layers' tensors are shared with it; a weight shared by several layers stays shared.

    Args:
        model: the full-precision model.
        setting: a record or a name (``"nf4"``, ``"int4-affine"``, ...; :func:`parse_settings`).
        blocksize: block (group) size.
        exclude: the layers to leave as they are, as in :func:`nf4lib.convert`.
    """
    (s,) = parse_settings([setting])
    why = s.missing()
    if why is not None:
        raise ImportError(why)
    done: dict[int, nn.Parameter] = {}
    new: dict[int, nn.Module] = {}
    for _, m in _layers(model, exclude):
        if id(m.weight) not in done:
            (_, _, w_hat, _), = reconstructions(linear_weight(m), [s], (blocksize,))
            w_hat = w_hat.t() if is_conv1d(m) else w_hat
            done[id(m.weight)] = nn.Parameter(w_hat.to(m.weight.dtype).contiguous(), requires_grad=False)
        layer = copy.copy(m)  # a new module object; its own parameter dict, the new weight in it
        layer._parameters = dict(m._parameters, weight=done[id(m.weight)])
        new[id(m)] = layer
    return replace_modules(model, new)


def neighbour_agreement(reference: torch.Tensor, candidate: torch.Tensor, *, k: int = 5) -> dict:
    """How well ``candidate`` embeddings preserve ``reference``'s nearest neighbours.

    Each row is a query against all other rows (cosine similarity). Retrieval with the
    quantized model agrees with the full-precision one to the extent the neighbours match.

    Args:
        reference: ``(n, d)`` embeddings of ``n`` items from the reference model.
        candidate: ``(n, d)`` embeddings of the same items from the model under test.
        k: neighbours compared per query (``1 <= k < n``).

    Returns:
        ``{"top1": fraction of queries whose nearest neighbour is the same,
        "overlap_at_k": mean |top-k(ref) & top-k(cand)| / k, "k": k, "queries": n}``
    """
    for name, t in (("reference", reference), ("candidate", candidate)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise TypeError(f"{name} must be a 2-D floating point tensor (items, dim), got "
                            f"{getattr(t, 'shape', type(t).__name__)}")
    if reference.shape != candidate.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and candidate {tuple(candidate.shape)} differ in shape")
    n = reference.shape[0]
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int in 1..{n - 1} (items - 1), got {k!r}")

    def top(e):
        e = torch.nn.functional.normalize(e.double(), dim=1)
        sim = e @ e.t()
        sim.fill_diagonal_(-float("inf"))  # a query is not its own neighbour
        return sim.topk(k, dim=1).indices

    a, b = top(reference), top(candidate)
    overlap = sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(n)) / (n * k)
    return {"top1": float((a[:, 0] == b[:, 0]).double().mean()), "overlap_at_k": overlap, "k": k, "queries": n}
