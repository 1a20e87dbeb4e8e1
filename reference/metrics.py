"""Error metrics in plain numpy (float64), written to be read: the oracle for nf4lib.analysis."""

import numpy as np


def error_metrics(x, x_hat):
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(x_hat, dtype=np.float64).ravel()
    e = y - x
    return {
        "mse": np.mean(e**2),
        "mae": np.mean(np.abs(e)),
        "rel_l2": np.linalg.norm(e) / np.linalg.norm(x),
        "sqnr_db": 10 * np.log10(np.sum(x**2) / np.sum(e**2)),
        "max_abs": np.max(np.abs(e)),
        "cosine": np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)),
    }
