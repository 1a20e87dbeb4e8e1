"""NF4 blockwise quantization in plain numpy, written to be read, not to be fast.

Every step is float32 arithmetic, in the order bitsandbytes uses, so results are
bit for bit what nf4lib and bitsandbytes produce. Loops run over blocks.
"""

import numpy as np
from scipy.stats import norm

F32 = np.float32


def torch_style_linspace(start, end, steps):
    """float32 linspace: steps up from start for the first half, down from end after."""
    step = (F32(end) - F32(start)) / F32(steps - 1)
    out = np.empty(steps, dtype=F32)
    for i in range(steps):
        if i < steps // 2:
            out[i] = F32(start) + step * F32(i)
        else:
            out[i] = F32(end) - step * F32(steps - 1 - i)
    return out


def normal_float(bits=4, symmetric=False):
    """k-bit NormalFloat levels (QLoRA construction, or the textbook symmetric one)."""
    n = 2**bits
    if symmetric:
        levels = norm.ppf((2 * np.arange(n) + 1) / (2 * n)).astype(F32)
        return levels / np.abs(levels).max()
    # QLoRA: the outer quantile sits at the mean of 1 - 1/(2(n-1)) and 1 - 1/(2n)
    offset = round(1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n)), 7)
    positive = norm.ppf(torch_style_linspace(offset, 0.5, n // 2 + 1)[:-1])
    negative = -norm.ppf(torch_style_linspace(offset, 0.5, n // 2)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]).astype(F32))
    return levels / levels.max()


def nf4():
    return normal_float(4)


def fp4():
    """bitsandbytes FP4, in its storage order (sign bit, then a 3-bit magnitude code)."""
    magnitudes = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=F32) / F32(12)
    return np.concatenate([magnitudes, -magnitudes]).astype(F32)


def int4():
    return (np.arange(-7, 8) / 7).astype(F32)


def nearest_level(value, code):
    """Storage index of the level nearest to a float32 value, the way bitsandbytes decides:
    sort the levels (stable), compare with float32 midpoints, a value on a midpoint goes low."""
    order = np.argsort(code, kind="stable")
    levels = code[order]
    position = 0
    for k in range(len(levels) - 1):
        midpoint = (levels[k] + levels[k + 1]) / F32(2)
        if value > midpoint:
            position = k + 1
    return int(order[position])


def quantize(x, blocksize, code):
    """x: float array (any shape). Returns (packed uint8 (ceil(n/2),), absmax float32 (n_blocks,))."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    n = flat.size
    indices, absmax = [], []
    for start in range(0, n, blocksize):
        block = flat[start : start + blocksize]
        if block.size == blocksize:
            amax = np.abs(block).max()
            # full block: multiply by the float32 reciprocal (of at least 1e-38)
            scaled = block * (F32(1) / max(amax, F32(1e-38)))
        else:
            # partial last block: the stored absmax is clamped, and the block is divided
            amax = max(np.abs(block).max(), F32(1e-38))
            scaled = block / amax
        absmax.append(F32(amax))
        indices += [nearest_level(v, code) for v in np.clip(scaled, -1, 1).astype(F32)]
    if n % 2:
        indices.append(nearest_level(F32(0), code))  # one padding zero
    packed = [(indices[i] << 4) | indices[i + 1] for i in range(0, len(indices), 2)]
    return np.array(packed, dtype=np.uint8), np.array(absmax, dtype=F32)


def dequantize(packed, absmax, code, n, blocksize):
    """float32 values: code[nibble] * absmax[block]."""
    out = np.empty(n, dtype=F32)
    for i in range(n):
        byte = int(packed[i // 2])
        nibble = byte >> 4 if i % 2 == 0 else byte & 15
        out[i] = code[nibble] * absmax[i // blocksize]
    return out


def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (Dettmers et al. 2022), 256 sorted floats."""
    values = [0.0, 1.0]
    for i in range(7):
        k = 2**i + 1
        edges = np.array([0.1 + (1 - 0.1) * j / (k - 1) for j in range(k)], dtype=F32)
        mids = (edges[:-1] + edges[1:]) / F32(2)
        values += list(mids * F32(10.0 ** (i - 6)))
        values += list(mids * F32(-(10.0 ** (i - 6))))
    return np.array(sorted(values), dtype=F32)


def grid_code(v, code, steps=65535):
    """8-bit code of a normalised float32 value the way bitsandbytes 0.50's CPU kernel
    picks it: round v to a point of a ``steps + 1``-point grid on [-1, 1], then take the
    code nearest that grid point. Not always the code nearest v itself."""
    v = F32(min(max(v, F32(-1)), F32(1))) if not np.isnan(v) else F32(-1)  # NaN: index 0
    t = (v + F32(1)) * F32(0.5)
    # the kernel's fused multiply-add, t * steps + 0.5 rounded once to float32: exact in
    # float64 (t has at most 25 fractional bits), then one rounding
    j = int(np.float32(np.float64(t) * steps + 0.5))
    point = F32(F32(F32(j) + F32(j)) / F32(steps)) - F32(1)
    return nearest_level(point, code)


def double_quantize(absmax, offset, code, blocksize=256):
    """8-bit codes and float32 scales for absmax - offset, in groups of ``blocksize``.

    ``offset`` is passed in: it is the float32 mean, whose last bit depends on the
    summation order of the library computing it.
    """
    centred = np.asarray(absmax, dtype=F32) - F32(offset)
    codes, scales = [], []
    for start in range(0, centred.size, blocksize):
        group = centred[start : start + blocksize]
        scale = max(F32(0), np.abs(group).max())
        scales.append(scale)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inverse = F32(1) / scale  # scale 0 (or subnormal): inf; 0 * inf = NaN -> code 0
            for v in group:
                codes.append(grid_code(F32(v * inverse), code))
    return np.array(codes, dtype=np.uint8), np.array(scales, dtype=F32)


def double_dequantize(codes, scales, offset, code, blocksize=256):
    return np.array(
        [code[c] * scales[i // blocksize] + F32(offset) for i, c in enumerate(codes)], dtype=F32
    )


def block_error(block, weights, scale, code):
    """(E, sum w v c, sum w c c, storage indices) of one block under ``scale``: each value
    takes the level nearest ``value * (1 / scale)``, clamped to [-1, 1] (quantize's rule).
    Every term is a float32 product; each sum is kept in 8 float32 lanes (value j in lane
    j % 8, added in order), and the lane totals are added in float64, lane 0 first."""
    r = F32(1) / max(F32(scale), F32(1e-38))
    lanes = np.zeros((3, 8), dtype=F32)
    indices = []
    for j, (v, w) in enumerate(zip(block, weights)):
        idx = nearest_level(F32(np.clip(v * r, -1, 1)), code)
        c = code[idx]
        e = F32(v - F32(c * F32(scale)))
        lanes[0, j % 8] = F32(lanes[0, j % 8] + F32(F32(w * e) * e))
        lanes[1, j % 8] = F32(lanes[1, j % 8] + F32(F32(w * v) * c))
        lanes[2, j % 8] = F32(lanes[2, j % 8] + F32(F32(w * c) * c))
        indices.append(idx)
    e2, xc, cc = (sum(float(x) for x in row) for row in lanes)
    return e2, xc, cc, indices


def quantize_mse(x, blocksize, code, weights=None, ratios=(0.95, 0.9, 0.85), steps=2):
    """Blockwise 4-bit quantization with each block's scale chosen to lower its squared
    error: absmax times each ratio (ratio 1 first), then least-squares steps
    ``s = sum w v c / sum w c^2`` kept while they lower the error. Returns (packed, scales)."""
    flat = np.asarray(x, dtype=F32).reshape(-1)
    n = flat.size
    w_all = np.ones(n, dtype=F32) if weights is None else np.resize(np.asarray(weights, dtype=F32).reshape(-1), n)
    indices, scales = [], []
    for start in range(0, n, blocksize):
        block, w = flat[start : start + blocksize], w_all[start : start + blocksize]
        amax = np.abs(block).max()
        best_s, best = amax, block_error(block, w, amax, code)
        for ratio in ratios:
            s = F32(amax * F32(ratio))
            trial = block_error(block, w, s, code)
            if trial[0] < best[0]:
                best_s, best = s, trial
        for _ in range(steps):
            if not best[2] > 0:
                break
            s = F32(best[1] / best[2])
            if not s > 0:
                break
            trial = block_error(block, w, s, code)
            if not trial[0] < best[0]:
                break
            best_s, best = s, trial
        scales.append(F32(best_s))
        indices += best[3]
    if n % 2:
        indices.append(nearest_level(F32(0), code))  # one padding zero
    packed = [(indices[i] << 4) | indices[i + 1] for i in range(0, len(indices), 2)]
    return np.array(packed, dtype=np.uint8), np.array(scales, dtype=F32)
