"""Error-minimising block scales (``quantize(..., scale="mse")``).

Dequantization is ``w ~= code[q] * scale[block]``, and nothing forces ``scale = absmax``:
a smaller scale spends the 16 levels on the bulk of the block and clips its largest
value. Per block, with ``q(v, s)`` the nearest level to ``v * (1 / s)`` clamped to
[-1, 1] (the rule quantize itself uses) and ``c`` its value, the block's (weighted)
squared error is

    ``E(s) = sum_j w_j (v_j - c_j s)^2``          (``w_j = 1`` without importance weights)

The search, vectorised over blocks:

1. ``E`` at ``s = absmax * r`` for ``r`` in ``RATIOS`` (1, 0.975, ..., 0.8); keep the best;
2. ``STEPS`` alternating steps: with the best scale's codes fixed, the least-squares scale
   ``s' = sum w v c / sum w c^2``; re-assign codes under ``s'``; keep it if ``E`` fell.

Ratio 1 is tried first, so no block's error is ever above absmax NF4's. Cost: 11
evaluations of ``E`` and one encoding, each one pass over the block (about 4x an absmax
quantize with the native CPU kernel, see ``benchmarks/bench_quantize.py``). On N(0, 1)
weights at blocksize 64 it lowers the MSE of NF4 by 13% (0.00846 -> 0.00735). The result
is stored exactly where absmax goes, so bitsandbytes (and anything reading its layout)
dequantizes it unchanged; double quantization applies to it as to absmax.

Importance weights (for example the diagonal of the inputs' second moments,
``E[x_k^2]`` per input feature) make ``E`` the expected squared error of the layer's
output rather than of its weights (GPTQ / AWQ use the same diagonal).

Every term is a float32 product in the order written; each sum is taken in 8 float32
lanes (element ``j`` in lane ``j % 8``, in order), then the 8 lane totals in double,
lane 0 first. The native CPU kernel (``_csrc/nf4cpu_mse.c``, whose AVX2 code holds
exactly those 8 lanes) and ``reference/nf4.py`` sum the same way, so all three pick the
same scales, bit for bit.
"""

from __future__ import annotations

import torch

from .encode import nearest_levels, pack, scaled, sorted_levels

__all__ = ["RATIOS", "STEPS", "search"]

# after ratio 1; on N(0, 1) at blocksize 64 these and 2 steps gain 13.0%, a grid of 8
# (0.975 .. 0.8) with 2 steps 13.2% for nearly twice the time, one ratio (0.9) 12.3%
RATIOS = torch.tensor([0.95, 0.9, 0.85], dtype=torch.float32)
STEPS = 2
_CHUNK_ELEMS = 1 << 18


def _lane_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of rows ``t`` (B, L) float32 as the native kernel takes it: 8 float32 lanes
    (element j in lane j % 8, added in order), then the lanes in double, lane 0 first."""
    pad = (-t.shape[1]) % 8
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))  # zero terms change no float32 sum
    t = t.view(t.shape[0], -1, 8)
    acc = t[:, 0]
    for k in range(1, t.shape[1]):
        acc = acc + t[:, k]
    total = acc[:, 0].double()
    for lane in range(1, 8):
        total = total + acc[:, lane].double()
    return total


def _error(v, w, s, thresholds, sorted_levels):
    """(E, sum w v c, sum w c c, levels) of rows ``v`` (B, L) under scales ``s`` (B,): the
    same float32 terms and sums as the native kernel."""
    levels = nearest_levels(scaled(v, s), thresholds)
    c = sorted_levels[levels]
    e = v - c * s[:, None]
    if w is None:
        te, tx, tc = e * e, v * c, c * c
    else:
        te, tx, tc = (w * e) * e, (w * v) * c, (w * c) * c
    return _lane_sum(te), _lane_sum(tx), _lane_sum(tc), levels


def _search(v, w, thresholds, sorted_levels):
    """Scales and sorted level indices of rows ``v`` (B, L) float32."""
    am = v.abs().amax(dim=1)
    best_s = am
    best = _error(v, w, am, thresholds, sorted_levels)

    def keep(better, s, trial):
        # the winner's scale, sums and levels, block by block
        sums = tuple(torch.where(better, new, old) for new, old in zip(trial[:3], best[:3]))
        return torch.where(better, s, best_s), sums + (torch.where(better[:, None], trial[3], best[3]),)

    for ratio in RATIOS.to(v.device):
        s = am * ratio
        trial = _error(v, w, s, thresholds, sorted_levels)
        best_s, best = keep(trial[0] < best[0], s, trial)
    active = torch.ones_like(am, dtype=torch.bool)
    for _ in range(STEPS):
        active = active & (best[2] > 0)
        s = torch.where(active, (best[1] / best[2].clamp(min=1e-300)).float(), best_s)
        active = active & (s > 0)
        trial = _error(v, w, s, thresholds, sorted_levels)
        active = active & (trial[0] < best[0])
        best_s, best = keep(active, s, trial)
    return best_s, best[3]


def search(flat: torch.Tensor, blocksize: int, levels: torch.Tensor, thresholds: torch.Tensor,
           to_storage: torch.Tensor, weights: torch.Tensor | None):
    """(packed uint8, scales float32) of the flattened, finite tensor ``flat``: each
    block's scale searched as above, its values encoded under it. ``levels`` in storage
    order; ``to_storage`` maps sorted index -> storage index; ``weights`` None or float32,
    element ``i`` weighed by ``weights[i % len]``. Pure PyTorch, any device."""
    n = flat.numel()
    table = sorted_levels(levels, to_storage)
    x = flat.detach().float()
    full = n - n % blocksize
    step = max(1, _CHUNK_ELEMS // blocksize) * blocksize
    # chunks of whole blocks, then the partial last block as one row of its own length
    spans = [(lo, min(full, lo + step), blocksize) for lo in range(0, full, step)]
    if full < n:
        spans.append((full, n, n - full))
    scale_parts, level_parts = [], []
    for lo, hi, length in spans:
        v = x[lo:hi].reshape(-1, length)
        w = None if weights is None else _weights_for(weights, lo, hi).reshape(-1, length)
        s, lv = _search(v, w, thresholds, table)
        scale_parts.append(s)
        level_parts.append(lv.reshape(-1))
    if not spans:
        return torch.empty(0, dtype=torch.uint8, device=flat.device), torch.empty(0, dtype=torch.float32, device=flat.device)
    return pack(torch.cat(level_parts), thresholds, to_storage), torch.cat(scale_parts)


def _weights_for(weights: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the weights repeated to the tensor's length."""
    period = weights.numel()
    if period >= hi:
        return weights[lo:hi]
    return weights[torch.arange(lo, hi, device=weights.device) % period]
