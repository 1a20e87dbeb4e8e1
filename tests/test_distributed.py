"""FSDP2 QLoRA with 2 processes (torchrun, gloo, bounded time): ``examples/fsdp_qlora.py``
run as written, then compared here with the same training in this one process.

Three launches (about 35 s on 2 cores): the example in fp32 with double quantization,
the example with ``MixedPrecisionPolicy(param_dtype=bf16)``, and a small job that shards
layers whose weights do not split into whole blocks.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import nf4lib
import nf4lib.distributed

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # each launch; killed (the whole process group) when it runs over


def _torchrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)}: no result after {TIMEOUT_S}s (killed)\n{out[-4000:]}")
    if proc.returncode:
        pytest.fail(f"{' '.join(args)} exited with {proc.returncode}\n{out[-6000:]}")
    return out


def _example():
    spec = importlib.util.spec_from_file_location("fsdp_qlora_example", os.path.join(ROOT, "examples", "fsdp_qlora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex(transformers, peft):
    return _example()


@pytest.fixture(scope="module")
def fp32_run(ex, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_fp32")
    log = _torchrun("examples/fsdp_qlora.py", "--out", str(out), "--double-quant")
    with open(out / "result.json") as f:
        return out, json.load(f), log


@pytest.fixture(scope="module")
def bf16_run(ex, fp32_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_bf16")
    log = _torchrun("examples/fsdp_qlora.py", "--out", str(out), "--bf16", "--checkpoint", str(fp32_run[0] / "base_fp32"))
    with open(out / "result.json") as f:
        return out, json.load(f), log


def _single_process(ex, base, *, bf16: bool, double_quant: bool):
    """The example's training in this process, without FSDP, on the whole of every batch."""
    cfg = ex.llama_config("tiny")
    model = ex.build(cfg, double_quant=double_quant, bf16=bf16, device="cpu", shard=False)
    missing, unexpected = nf4lib.distributed.load_from_rank0(model, str(base), strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)
    nf4lib.distributed.load_from_rank0(model, ex.adapter_init(model), strict=False)
    forward = None  # the model's own forward
    if bf16:
        # FSDP2's mixed precision: every parameter cast to bf16 for compute (the NF4 weights
        # keep their bytes and compute in bf16), fp32 master adapters and optimizer.
        # Activation checkpointing would recompute outside functional_call: off here.
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()

        def bf16_forward(m, ids):
            params = {n: p.to(torch.bfloat16) for n, p in m.named_parameters()}
            return torch.func.functional_call(m, params, (), {"input_ids": ids, "labels": ids}).loss

        forward = bf16_forward
    return model, ex.train(model, ex.batches(cfg, 20), forward=forward)


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs()).max().item()


def test_each_rank_holds_half_of_every_4bit_weight_which_never_changes(fp32_run):
    _, res, log = fp32_run
    assert res["world"] == 2 and len(res["losses"]) == 20
    assert [r["nf4_bytes_local"] for r in res["per_rank"]] == [res["nf4_bytes_full"] // 2] * 2
    assert res["four_bit_unchanged"] is True
    assert res["losses"][-1] < res["losses"][0] - 0.3, res["losses"]  # the adapters learn
    assert "4-bit data unchanged: True" in log


def test_fp32_loss_curve_equals_the_single_process_run(ex, fp32_run):
    out, res, _ = fp32_run
    _, losses = _single_process(ex, out / "base_fp32", bf16=False, double_quant=True)
    # 2 ranks average two half-batch means and reduce-scatter the gradients: the sums run
    # in another order, which moves fp32 results by a few ulps (~1e-7), far below 1e-4
    assert _rel(res["losses"], losses) < 1e-4


def test_bf16_loss_curve_equals_the_single_process_run_within_bf16_precision(ex, fp32_run, bf16_run):
    _, res, _ = bf16_run
    _, losses = _single_process(ex, fp32_run[0] / "base_fp32", bf16=True, double_quant=False)
    # bf16 keeps 8 significant bits: one rounding is up to 2**-8 relative; both runs round
    # the same values, only the reduction order differs
    assert _rel(res["losses"], losses) < 2**-7
    assert res["resume_identical"] is True


def test_dcp_checkpoint_resumes_in_two_processes_and_in_one(ex, fp32_run):
    import torch.distributed.checkpoint as dcp

    out, res, _ = fp32_run
    assert res["resume_identical"] is True  # the example's own resume, 2 processes
    model = ex.build(ex.llama_config("tiny"), double_quant=True, bf16=False, device="cpu", shard=False).eval()
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=str(out / "dcp"), planner=nf4lib.distributed.LoadPlanner(), no_dist=True)
    model.load_state_dict(sd)
    probe = torch.load(out / "probe.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe["probe"]).logits, probe["logits"], rtol=1e-6, atol=1e-6)


def test_gathered_full_state_dict_is_bitsandbytes_keys_and_bytes(ex, fp32_run, bnb, transformers):
    from safetensors.torch import load_file

    out, _, _ = fp32_run
    gathered = load_file(out / "base.safetensors")
    single, _ = _single_process(ex, out / "base_fp32", bf16=False, double_quant=True)
    want = {nf4lib.distributed.peft_base_key(k): v for k, v in single.state_dict().items() if "lora_" not in k}
    assert set(gathered) == set(want)
    for k in want:
        assert torch.equal(gathered[k], want[k]), k  # the 4-bit weights are the single process's, bit for bit
    assert any(k.endswith("quant_state.bitsandbytes__nf4") for k in gathered)
    # ... and loads into transformers + bitsandbytes as a pre-quantized checkpoint, and into nf4lib
    hf_dir = out / "hf_bnb"
    hf_dir.mkdir()
    with open(out / "base_fp32" / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    ).to_dict()
    with open(hf_dir / "config.json", "w") as f:
        json.dump(config, f)
    os.link(out / "base.safetensors", hf_dir / "model.safetensors")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, device_map="cpu")
    assert isinstance(hf.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    hf_sd = hf.state_dict()
    assert set(hf_sd) == set(gathered) and all(torch.equal(hf_sd[k], gathered[k]) for k in gathered)
    ours = nf4lib.convert(transformers.LlamaForCausalLM.from_pretrained(out / "base_fp32"), double_quant=True)
    ours.load_state_dict(gathered, strict=True)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_layers_that_do_not_shard_raise_on_every_rank_naming_the_layer(tmp_path):
    _torchrun("tests/_fsdp_bad_shapes.py", str(tmp_path))
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert results[0] == results[1] | {"even": results[0]["even"]}  # the same errors on both ranks
    for case, pattern in [
        ("partial_block", "NF4 weight 'proj' of shape (6, 96): a shard of 3 x 96 = 288 weights is not a whole number of blocks"),
        ("uneven_rows", "NF4 weight 'proj' of shape (5, 128): 5 rows do not split into equal shards of 3"),
        ("partial_group", "NF4 weight 'proj' of shape (128, 128): a shard of 64 x 128 = 8192 weights"),
    ]:
        assert results[0][case]["ok"] is False and pattern in results[0][case]["error"], results[0][case]
    for r in results:
        assert r["even"] == {"ok": True, "local_rows": 128, "local_packed": 128 * 256 // 2}
