"""Run by tests/test_distributed.py under torchrun (2 processes): fully_shard of NF4
layers whose weights do not split into whole blocks must raise, on every rank, an error
naming the layer and the shapes (never hang, never shard wrongly). Writes the messages
to <out>/rank<r>.json."""

import json
import os
import sys

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import nf4lib

CASES = {
    # 6 rows: 3 per rank x 96 = 288 weights, not a multiple of the 64-weight block
    "partial_block": dict(shape=(96, 6), double_quant=False),
    # 5 rows over 2 ranks: FSDP2 would pad the last shard
    "uneven_rows": dict(shape=(128, 5), double_quant=False),
    # 128 x 128 over 2: 128 blocks per rank, not whole 256-block groups
    "partial_group": dict(shape=(128, 128), double_quant=True),
    # shards evenly: the control
    "even": dict(shape=(256, 256), double_quant=True),
}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for case, spec in CASES.items():
        in_f, out_f = spec["shape"]
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(in_f, out_f))
        model = nf4lib.convert(model, exclude=(), double_quant=spec["double_quant"])
        try:
            fully_shard(model.proj)
            local = model.proj.weight.to_local()
            results[case] = {"ok": True, "local_rows": local.shape[0], "local_packed": local.packed.numel()}
        except ValueError as e:
            results[case] = {"ok": False, "error": str(e)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
