"""``nf4lib quantize IN OUT --calibrate FILE``: a calibrated (GPTQ-NF4) model directory.

Unlike the streaming ``quantize``, calibration runs the model, so the whole model is loaded
(with transformers) and needs a tokenizer in IN for a text FILE. OUT is written by
``save_pretrained`` into a hidden folder beside it and renamed into place when complete; it
holds bitsandbytes' ``quantization_config`` and loads with ``from_pretrained``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import Counter

from ..core.errors import CheckpointError


def _batches(spec: str, src: str):
    from ..transforms.calibrate import default_text, text_batches

    if spec.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            ids = load_file(spec).get("input_ids")
        except Exception as e:  # a missing or corrupt file: one line
            raise CheckpointError(f"{spec}: not a readable safetensors file ({e})") from None
        if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point or ids.shape[0] < 1:
            raise CheckpointError(f"{spec}: needs an integer 'input_ids' tensor of shape (sequences, tokens)")
        return [{"input_ids": row[None].long()} for row in ids]
    if spec == "default":
        text = default_text()
    else:
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{spec}: not a readable UTF-8 text file ({e})") from None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise CheckpointError(f"{src}: a text calibration FILE needs IN's tokenizer, which does not load ({e}); "
                              f"give token ids in a .safetensors file instead") from None
    try:
        return text_batches(tokenizer, text)
    except ValueError as e:
        raise CheckpointError(f"{spec}: {e}") from None


def check_out_directory(args, src: str) -> tuple:
    """``(out, parent)`` for a model directory OUT that bitsandbytes will read: a blocksize it
    reads, OUT missing or empty, not IN, in an existing parent (both directory writers use it)."""
    if not 32 <= args.blocksize <= 4096:
        raise CheckpointError(f"{args.output}: bitsandbytes reads blocksizes 32..4096, not {args.blocksize}; "
                              f"write OUT as a .safetensors file (nf4lib.load_quantized reads it)")
    out = os.path.abspath(args.output)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{args.output}: exists and is not an empty directory")
    if os.path.realpath(out) == os.path.realpath(src):
        raise CheckpointError(f"{args.output}: OUT must differ from IN")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{args.output}: the parent directory {parent} does not exist")
    return out, parent


def quantize_calibrated(args, exclude: list) -> int:
    src = args.input
    if not (os.path.isdir(src) and os.path.isfile(os.path.join(src, "config.json"))):
        raise CheckpointError(f"{src}: --calibrate needs IN to be a model directory with a config.json")
    if args.output.endswith(".safetensors"):
        raise CheckpointError(f"{args.output}: with --calibrate, OUT is a model directory (a name without .safetensors)")
    out, parent = check_out_directory(args, src)
    try:
        import transformers
    except ImportError:
        raise CheckpointError("--calibrate runs the model and needs transformers (pip install transformers)") from None
    from ..core.spec import QuantSpec
    from ..transforms.calibrate import calibrate

    batches = _batches(args.calibrate, src)
    try:
        config = transformers.AutoConfig.from_pretrained(src)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(src, dtype="auto").eval()
    except Exception as e:
        raise CheckpointError(f"{src}: transformers cannot load this model ({e})") from None
    spec = QuantSpec(blocksize=args.blocksize, code=args.code, double_quant=args.double_quant, scale=args.scale)
    qmodel, layers = calibrate(model, batches, spec=spec, exclude=exclude, progress=args.progress)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".nf4lib-", dir=parent)
    try:
        qmodel.save_pretrained(tmp)
        for name in sorted(os.listdir(src)):  # tokenizer and the like, where save_pretrained wrote nothing
            path = os.path.join(src, name)
            if os.path.isfile(path) and not os.path.exists(os.path.join(tmp, name)) and \
                    not name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")):
                shutil.copy2(path, os.path.join(tmp, name))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    choices = Counter(r["choice"] for r in layers)
    held = [r["heldout"][r["choice"]] for r in layers if r["heldout"] is not None]
    note = f"; held-out output error vs plain NF4: mean {sum(held) / len(held):.3f}x" if held else ""
    print(f"wrote {args.output}/: {len(layers)} layers calibrated on {len(batches)} batches "
          f"({', '.join(f'{k} {v}' for k, v in sorted(choices.items()))}){note}; loads with transformers + "
          f"bitsandbytes (from_pretrained)", file=sys.stdout)
    return 0
