"""FSDP2 (fully_shard) training steps of a RoSTE QAT model; run with torch.distributed.run."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

import hf_roste  # noqa: F401
from hf_roste import RoSTEConfig


def main() -> None:
    path, mode, report = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(rotation_search="all"),
                                                 dtype=torch.float32)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    if mode == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if dist.get_rank() == 0:
        with open(report, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
