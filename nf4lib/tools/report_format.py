"""The ``nf4lib report`` result as text: the table (with the matched-bits summary line) and CSV."""

from __future__ import annotations

import csv
import io

METRICS = ("bits_per_param", "mse", "mae", "rel_l2", "sqnr_db", "max_abs", "cosine")


def mib(b) -> str:
    return f"{b / 2**20:.2f}"


def _matched_bits(res) -> str:
    """One line: NF4 against the strongest INT4 at the same bits per parameter."""
    t = res["totals"]["settings"]
    nf4, bits = t["nf4"]["sqnr_db"], t["nf4"]["bits_per_param"]
    if "int4-affine" not in t:
        return (f"at {bits:.3f} bits/weight: nf4 {nf4:.2f} dB; affine INT4 not measured "
                f"(torchao is not installed), symmetric INT4 {t['int4-symmetric']['sqnr_db']:.2f} dB is the weaker INT4")
    aff = t["int4-affine"]["sqnr_db"]
    who = "nf4" if nf4 > aff else "affine INT4"
    return (f"at matched bits ({bits:.3f} bits/weight, blocksize {res['blocksize']}): nf4 {nf4:.2f} dB vs affine INT4 "
            f"(torchao, bf16 scale + zero) {aff:.2f} dB: {who} is {abs(nf4 - aff):.2f} dB better; nf4-mse "
            f"{t['nf4-mse']['sqnr_db']:.2f} dB, same bits")


def as_table(res) -> str:
    s = res["settings"]
    w = max(24, max(len(r["layer"]) for r in res["layers"]) + 1)
    cw = {x: max(9, len(x) + 2) for x in s}  # column widths
    head = f"{'layer':<{w}}{'shape':>14}{'params':>11}" + "".join(f"{x:>{cw[x]}}" for x in s) + f"{'MiB':>9}{'MiB nf4':>9}{'MiB dq':>9}"
    lines = [
        f"nf4lib report: {res['model']}",
        f"blocksize {res['blocksize']}; error = relative L2 error ||W_hat - W|| / ||W|| in %, lower is better; "
        f"excluded: {', '.join(res['exclude']) or 'nothing'}",
        "", head, "-" * len(head),
    ]

    def row(name, shape, params, before, sets):
        return (f"{name:<{w}}{shape:>14}{params:>11,}" + "".join(f"{100 * sets[x]['rel_l2']:>{cw[x]}.2f}" for x in s)
                + f"{mib(before):>9}{mib(sets['nf4']['bytes_after']):>9}{mib(sets['nf4+dq']['bytes_after']):>9}")

    for r in res["layers"]:
        lines.append(row(r["layer"], "x".join(map(str, r["shape"])), r["params"], r["bytes_before"], r["settings"]))
    t = res["totals"]
    lines += ["-" * len(head), row(f"TOTAL ({len(res['layers'])} layers)", "", t["params"], t["bytes_before"], t["settings"])]
    sq = ", ".join(f"{x} {t['settings'][x]['sqnr_db']:.2f} dB" for x in s)
    c = res["checkpoint"]
    lines += [
        "", f"SQNR over all quantized weights: {sq}", _matched_bits(res),
        *(f"note: skipped {why}" for why in res["skipped"]),
        f"whole checkpoint ({c['tensors']} tensors, {c['tensors'] - c['quantized']} kept as they are, "
        f"{mib(c['bytes_kept'])} MiB): {mib(c['bytes_before'])} MiB -> "
        + ", ".join(f"{mib(c['bytes_after'][x])} MiB ({x})" for x in ("nf4", "nf4+dq")),
    ]
    return "\n".join(lines)


def as_csv(res) -> str:
    buf = io.StringIO()
    cols = ["layer", "shape", "params", "setting", "blocksize", *METRICS, "bytes_before", "bytes_after"]
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(cols)
    for r in res["layers"] + [{"layer": "TOTAL", "shape": [], **res["totals"]}]:
        for name, m in r["settings"].items():
            wr.writerow([r["layer"], "x".join(map(str, r["shape"])), r["params"], name, res["blocksize"],
                         *(m[k] for k in METRICS), r["bytes_before"], m["bytes_after"]])
    return buf.getvalue()
