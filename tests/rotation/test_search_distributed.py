"""Rotation search under torch.distributed (2 CPU processes, gloo): every rank ends identical."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 30, (24,), generator=g)
    return [{"input_ids": torch.randint(0, 128, (int(k),), generator=g).tolist()} for k in lengths]


def _worker(rank: int, port: int, ckpt: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from transformers import AutoModelForCausalLM

        from hf_roste import RoSTEConfig, sample_calibration_batches, search_rotation_config

        model = AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=RoSTEConfig(), dtype=torch.float32, attn_implementation="eager"
        )
        # each rank draws its own share of the same sample (rank / world size from torch.distributed)
        batches = sample_calibration_batches(_data(), 16, seed=1, batch_size=4)
        out = {}
        for strategy in ("adaptive", "layerwise"):
            r = search_rotation_config(model, batches, strategy=strategy, apply=strategy == "layerwise")
            out[strategy] = {"config": r.rotation_config, "tokens": r.tokens, "samples": r.samples,
                             "local_tokens": sum(int(b["attention_mask"].sum()) for b in batches)}
        out["recorded"] = model.config.quantization_config.rotation_config
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_and_match_single_process(tmp_path):
    from tiny_models import save_tiny
    from transformers import AutoModelForCausalLM

    from hf_roste import RoSTEConfig, sample_calibration_batches, search_rotation_config

    ckpt = save_tiny("llama", tmp_path / "ckpt")
    mp.spawn(_worker, args=(_free_port(), str(ckpt), str(tmp_path)), nprocs=WORLD, join=True)
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    local = [[o[s].pop("local_tokens") for o in outs] for s in ("adaptive", "layerwise")]
    assert local[0][0] != local[0][1]  # the ranks measured different batches...
    assert outs[0] == outs[1]  # ...and hold the identical configuration, errors and strategy
    a = outs[0]["adaptive"]
    assert a["tokens"] == sum(local[0])
    assert a["samples"] == 16
    # the reduced statistics equal one process searching the union of both ranks' batches
    single = AutoModelForCausalLM.from_pretrained(
        ckpt, quantization_config=RoSTEConfig(), dtype=torch.float32, attn_implementation="eager"
    )
    union = sample_calibration_batches(_data(), 16, seed=1, batch_size=4)
    ref = search_rotation_config(single, union, apply=False)
    assert a["tokens"] == ref.tokens
    assert a["config"]["layers"] == ref.layers
    for got, want in zip(a["config"]["errors"], ref.rotation_config["errors"], strict=True):
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-4)
