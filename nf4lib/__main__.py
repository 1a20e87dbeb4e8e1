"""``python -m nf4lib``: quantize a sample weight and print its error and memory."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    import torch

    import nf4lib

    torch.manual_seed(0)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    print(f"sample weight: randn(4096, 4096), bf16, {w.numel() * 2 / 2**20:.1f} MiB")
    print(f"{'setting':<22}{'bits/param':>11}{'MiB':>8}{'rel L2 err':>12}{'SQNR dB':>9}")
    ref = w.float()
    for name, kwargs in [
        ("nf4, bs 64", {}),
        ("nf4 + double quant", {"double_quant": True}),
        ("int4, bs 64", {"code": "int4"}),
        ("fp4, bs 64", {"code": "fp4"}),
    ]:
        q = nf4lib.quantize(w, **kwargs)
        err = nf4lib.dequantize(q, torch.float32) - ref
        rel = (err.norm() / ref.norm()).item()
        sqnr = 10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum()).item()
        bpp = nf4lib.bits_per_parameter(q)
        print(f"{name:<22}{bpp:>11.3f}{bpp * w.numel() / 8 / 2**20:>8.1f}{rel:>12.4f}{sqnr:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
