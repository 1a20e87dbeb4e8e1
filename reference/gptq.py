"""GPTQ on a 4-bit codebook grid in plain numpy, written to be read: the oracle for
``nf4lib.gptq.gptq_quantize`` (Frantar et al., ICLR 2023, with bitsandbytes' blocks).

One column at a time, no lazy batches:

    H <- H + damp * mean(diag H) * I                 (a never-seen input's diagonal first set to 1)
    U  = upper Cholesky factor of H^-1
    for j in columns (in order):
        at the first column of a block: s[row] = max |W[row, block]|       (float32)
        q      = #{t : t < clip(float32(W[:, j]) * float32(1 / s), -1, 1)}  (ties go down)
        W_hat  = float32(code[q] * s)
        e      = (W[:, j] - W_hat) / U[j, j]
        W[:, k] -= e * U[j, k]   for every k > j
"""

import numpy as np

F32 = np.float32


def gptq(w, h, code, thresholds, blocksize, damp=0.01):
    """Returns (level indices (out, in) int, scales (out, in // blocksize) float32,
    w_hat (out, in) float32). ``code``: the sorted levels; ``thresholds``: their midpoints."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    h = (h + h.T) / 2
    out_f, in_f = w.shape
    d = np.diag(h).copy()
    d[d <= 0] = 1.0
    d += damp * d.mean()
    np.fill_diagonal(h, d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: U^T U = H^-1
    code = np.asarray(code, dtype=F32)
    thresholds = np.asarray(thresholds, dtype=F32)
    q = np.zeros((out_f, in_f), dtype=np.int64)
    scales = np.zeros((out_f, in_f // blocksize), dtype=F32)
    w_hat = np.zeros((out_f, in_f), dtype=F32)
    for j in range(in_f):
        b = j // blocksize
        if j % blocksize == 0:
            scales[:, b] = np.abs(w[:, j : j + blocksize].astype(F32)).max(axis=1)
        s = scales[:, b]
        inv = (F32(1) / np.maximum(s, F32(1e-38))).astype(F32)
        v = np.clip((w[:, j].astype(F32) * inv).astype(F32), -1, 1)
        q[:, j] = (v[:, None] > thresholds[None, :]).sum(axis=1)
        w_hat[:, j] = (code[q[:, j]] * s).astype(F32)
        e = (w[:, j] - w_hat[:, j].astype(np.float64)) / u[j, j]
        w[:, j + 1 :] -= np.outer(e, u[j, j + 1 :])
    return q, scales, w_hat
