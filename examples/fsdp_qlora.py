"""QLoRA with FSDP2: a 4-bit Llama sharded over every process, LoRA adapters trained.

    torchrun --nproc_per_node 2 examples/fsdp_qlora.py              # CPU: gloo
    torchrun --nproc_per_node 8 examples/fsdp_qlora.py --bf16       # GPUs: nccl, unchanged

What it does, on every rank:

1. builds the Llama on the meta device (no memory), converts its linear layers to NF4
   (``nf4lib.convert``; ``lm_head`` stays full precision), adds PEFT LoRA adapters,
   shards each decoder layer and the root with ``fully_shard`` (bf16 compute with
   ``--bf16``), and allocates only its shards (``to_empty``);
2. fills them from a full-precision safetensors checkpoint that only rank 0 reads,
   quantizing one tensor at a time (``nf4lib.distributed.load_from_rank0``): no rank
   ever holds the full-precision model; each holds 1/world of every 4-bit weight;
3. trains the adapters with AdamW for ``--steps`` steps on its slice of each batch, with
   activation checkpointing; the 4-bit data never changes;
4. saves the sharded model and adapters with ``torch.distributed.checkpoint``, resumes a
   fresh sharded model from it (outputs must be identical), and gathers a full state
   dict (bitsandbytes ``Linear4bit`` keys and bytes) that rank 0 writes as
   ``base.safetensors`` (loads into transformers + bitsandbytes, or nf4lib) and
   ``adapter.safetensors``.

Without ``--checkpoint`` rank 0 first writes a randomly initialised model of
``--size`` (``tiny``, or ``1b``: 1.2 GiB of fp32 weights) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import nf4lib
import nf4lib.distributed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    # every weight shards over 2 ranks on whole 256-block groups (double quantization)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, vocab_size=1024),
}


def llama_config(size: str):
    import transformers

    return transformers.LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=256, use_cache=False)


def write_base_checkpoint(cfg, path: str, seed: int = 0) -> None:
    """A randomly initialised full-precision Llama as ``model.safetensors`` (rank 0 only)."""
    import transformers

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def build(cfg, *, double_quant: bool, bf16: bool, device, shard: bool = True, lora_r: int = 8):
    """The QLoRA model: NF4 base, LoRA adapters; sharded with FSDP2 (``shard``) and
    allocated on ``device`` but not initialised (fill it with ``load_from_rank0``)."""
    import peft
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = nf4lib.convert(model, double_quant=double_quant)  # lm_head stays full precision
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=TARGETS, lora_dropout=0.0))
    # activation checkpointing of each decoder layer (transformers >= 5 names it activation_*)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if shard:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    # to_empty leaves buffers uninitialised; RoPE's are computed, not stored: recompute them
    rotary = model.base_model.model.model.rotary_emb
    with torch.device("cpu"):
        fresh = type(rotary)(cfg)
    for name, buf in fresh.named_buffers():
        getattr(rotary, name).copy_(buf)
    return model


def adapter_init(model, seed: int = 0) -> dict:
    """PEFT's LoRA initialisation (A: Kaiming-uniform, B: zeros), as full tensors made the
    same way in every run (seeded per key), so single- and multi-process runs start equal."""
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            continue
        if "lora_A" in key:
            g = torch.Generator().manual_seed(seed + sum(key.encode()))
            bound = 1 / math.sqrt(value.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
            out[key] = (torch.rand(tuple(value.shape), generator=g) * 2 - 1) * bound
        else:
            out[key] = torch.zeros(tuple(value.shape))
    return out


def batches(cfg, steps: int, batch: int = 4, seq: int = 32, seed: int = 0, distinct: int = 2) -> list:
    """``steps`` batches cycling through ``distinct`` random ones (a tiny dataset the
    adapters can fit, so the loss visibly falls even on a random base model)."""
    g = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(distinct)]
    return [data[i % distinct] for i in range(steps)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def nf4_bytes(model) -> tuple[int, int]:
    """(bytes of 4-bit data this rank holds, bytes of the full 4-bit weights)."""
    local = full = 0
    for module in model.modules():
        if isinstance(module, nf4lib.NF4Linear):
            shard = module._nf4()
            for name in ("packed", "absmax", "nested_absmax"):
                t = getattr(shard, name)
                if t is not None:
                    local += t.numel() * t.element_size()
            n = module.out_features * module.in_features
            blocks = -(-n // module.blocksize)
            full += (n + 1) // 2 + (blocks + 4 * -(-blocks // 256) if module.double_quant else 4 * blocks)
    return local, full


def four_bit_snapshot(model) -> dict:
    return {n: t.clone() for n, m in model.named_modules() if isinstance(m, nf4lib.NF4Linear)
            for n, t in [(n, m._nf4().packed), (n + ".absmax", m._nf4().absmax)]}


def train(model, data, *, rank: int = 0, world: int = 1, lr: float = 1e-3, forward=None) -> list:
    """AdamW on the adapters; each rank takes its slice of every batch. Returns the losses.

    ``forward(model, ids) -> loss`` replaces ``model(input_ids=ids, labels=ids).loss``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    device = next(p for p in model.parameters() if p.requires_grad).device
    for ids in data:
        ids = ids.chunk(world)[rank].to(device)
        loss = forward(model, ids) if forward else model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if world > 1:
            dist.all_reduce(loss)  # equal slices: the mean of the means is the batch mean
            loss /= world
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--checkpoint", help="a full-precision Llama-family model: Hugging Face directory (its config is used) or "
                    ".safetensors file (with --size's config); default: write a random one")
    ap.add_argument("--out", default="fsdp_qlora_out")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16): compute in bf16")
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--no-resume", action="store_true", help="skip the save / resume / gather step")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.checkpoint and os.path.isdir(args.checkpoint):  # a Hugging Face model directory: its own config
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(args.checkpoint)
        cfg.use_cache = False
    else:
        cfg = llama_config(args.size)
    os.makedirs(args.out, exist_ok=True)
    base = args.checkpoint or os.path.join(args.out, "base_fp32")
    if rank == 0 and not args.checkpoint and not os.path.exists(os.path.join(base, "model.safetensors")):
        write_base_checkpoint(cfg, base)
    dist.barrier()
    result = {"world": world, "device": str(device), "bf16": args.bf16, "double_quant": args.double_quant, "size": args.size}
    rss_start = peak_rss_mib()

    t0 = time.perf_counter()
    model = build(cfg, double_quant=args.double_quant, bf16=args.bf16, device=device)
    missing, unexpected = nf4lib.distributed.load_from_rank0(model, base if rank == 0 else None, strict=False)
    if unexpected or any("lora_" not in k for k in missing):
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    nf4lib.distributed.load_from_rank0(model, adapter_init(model) if rank == 0 else None, strict=False)
    result["load_s"] = time.perf_counter() - t0
    result["peak_rss_after_load_mib"] = peak_rss_mib()
    result["nf4_bytes_local"], result["nf4_bytes_full"] = nf4_bytes(model)
    before = four_bit_snapshot(model)

    t0 = time.perf_counter()
    data = batches(cfg, args.steps)
    result["losses"] = train(model, data, rank=rank, world=world, lr=args.lr)
    result["train_s"] = time.perf_counter() - t0
    result["peak_rss_after_train_mib"] = peak_rss_mib()
    after = four_bit_snapshot(model)
    result["four_bit_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)

    if not args.no_resume:
        model.eval()
        probe = batches(cfg, 1, seed=123)[0].to(device)
        with torch.no_grad():
            logits = model(input_ids=probe).logits.float()
        ckpt = os.path.join(args.out, "dcp")
        dcp.save(get_model_state_dict(model), checkpoint_id=ckpt)
        fresh = build(cfg, double_quant=args.double_quant, bf16=args.bf16, device=device).eval()
        sd = get_model_state_dict(fresh)
        dcp.load(sd, checkpoint_id=ckpt, planner=nf4lib.distributed.LoadPlanner())
        fresh.load_state_dict(sd)
        with torch.no_grad():
            result["resume_identical"] = torch.equal(fresh(input_ids=probe).logits.float(), logits)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            from safetensors.torch import save_file

            base_sd = {nf4lib.distributed.peft_base_key(k): v.contiguous() for k, v in full.items() if "lora_" not in k}
            adapters = {k.replace(".default", ""): v.contiguous() for k, v in full.items() if "lora_" in k}
            save_file(base_sd, os.path.join(args.out, "base.safetensors"))
            save_file(adapters, os.path.join(args.out, "adapter.safetensors"))
            torch.save({"probe": probe.cpu(), "logits": logits.cpu()}, os.path.join(args.out, "probe.pt"))

    result["rss_at_start_mib"] = rss_start
    gathered = [None] * world
    keys = ("rss_at_start_mib", "peak_rss_after_load_mib", "peak_rss_after_train_mib", "nf4_bytes_local")
    dist.all_gather_object(gathered, {k: result[k] for k in keys})
    result["per_rank"] = gathered
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"world {world} on {device}, {'bf16' if args.bf16 else 'fp32'}, double_quant={args.double_quant}")
        print(f"4-bit bytes per rank: {[r['nf4_bytes_local'] for r in gathered]} of {result['nf4_bytes_full']} "
              f"({result['nf4_bytes_full'] / max(1, gathered[0]['nf4_bytes_local']):.2f}x less each)")
        print(f"peak RSS per rank after load (MiB): {[round(r['peak_rss_after_load_mib']) for r in gathered]}; "
              f"after training: {[round(r['peak_rss_after_train_mib']) for r in gathered]}")
        print(f"losses: {' '.join(f'{x:.4f}' for x in result['losses'])}")
        print(f"4-bit data unchanged: {result['four_bit_unchanged']}; resumed from DCP identical: {result.get('resume_identical')}")
        print(f"load {result['load_s']:.1f}s, train {result['train_s']:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
