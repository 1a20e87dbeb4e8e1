"""The default kernels of the three ops, registered for every device without its own:
readable pure PyTorch, written as the formulas read, and the reference every other
kernel is tested against (and ``reference/``, plain numpy, is the oracle for these).
"""

from __future__ import annotations

import torch

from ..core import mse
from ..core.checks import raise_not_finite
from ..core.encode import nearest_levels, pack, scaled
from ..ops.library import register_kernel

__all__ = ["quantize", "dequantize", "linear", "linear_grad", "encode_blocks", "encode_tail"]


def encode_blocks(rows: torch.Tensor, thresholds: torch.Tensor, to_storage):
    """Whole blocks ``rows`` (n_blocks, blocksize), any float dtype -> (packed, absmax):

        ``absmax = max |row|``,  ``q = nearest level to row * (1 / absmax)``
    """
    rows = rows.float()
    absmax = rows.abs().amax(dim=1)
    return pack(nearest_levels(scaled(rows, absmax), thresholds), thresholds, to_storage), absmax


def encode_tail(tail: torch.Tensor, thresholds: torch.Tensor, to_storage):
    """The partial last block: bitsandbytes divides here (not the reciprocal), clamps
    absmax at 1e-38, and pads an odd length with the code of 0."""
    tail = tail.float()
    am = tail.abs().amax().clamp(min=1e-38)
    return pack(nearest_levels(tail / am, thresholds), thresholds, to_storage), am.reshape(1)


@register_kernel("quantize", None)
def quantize(x, blocksize, code, thresholds, to_storage, scale, weights):
    n = x.numel()
    if scale == "mse":
        if not bool(torch.isfinite(x).all()):
            raise_not_finite(x, blocksize)
        storage = torch.arange(16, device=x.device) if to_storage is None else to_storage
        return mse.search(x, blocksize, code, thresholds, storage, weights)
    full = n - n % blocksize
    packed, absmax = encode_blocks(x[:full].view(-1, blocksize), thresholds, to_storage)
    if full < n:
        p, a = encode_tail(x[full:], thresholds, to_storage)
        packed, absmax = torch.cat([packed, p]), torch.cat([absmax, a])
    # A NaN or Inf anywhere makes its block's absmax NaN or Inf: check the small vector.
    if not bool(torch.isfinite(absmax).all()):
        raise_not_finite(x, blocksize)
    return packed, absmax


@register_kernel("dequantize", None)
def dequantize(q, dtype):
    # w[i] = code[q[i]] * absmax[i // blocksize] in float32, then cast
    n, bs = q.numel, q.blocksize
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=-1).reshape(-1)[:n].long()
    values = q.code.float()[codes]
    absmax = q.scales.dequantize()
    full = n - n % bs
    head = (values[:full].reshape(-1, bs) * absmax[: full // bs, None]).reshape(-1)
    if full < n:
        head = torch.cat([head, values[full:] * absmax[-1]])
    return head.to(dtype).view(q.shape)


@register_kernel("quantized_linear", None)
def linear(x, q, bias):
    # y = x @ W.T + b, W in x's dtype, exactly as F.linear(x, dequantize(q).to(x.dtype), b)
    return torch.nn.functional.linear(x, dequantize(q, x.dtype), bias)


@register_kernel("quantized_linear_grad", None)
def linear_grad(grad, q):
    # dL/dx = dL/dy @ W, W in grad's dtype
    return grad @ dequantize(q, grad.dtype)
