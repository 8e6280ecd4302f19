"""Scaling: training-step and rotation-search cost at three model widths.

Llama-shaped, randomly initialised, fp32, sdpa, 2 threads; widths (hidden) 256 / 512 / 1024 (quick:
64 / 128 / 256), 4 layers (quick 2), intermediate 4 x hidden, head_dim 64, vocab 2048, batch 2 x 128.
Per width, in one process: plain fp32 and RoSTE W4A4KV4 (all rotations on) optimizer steps
interleaved (ratio RoSTE / plain, median and min-max); then one quantized forward over a calibration
set (8 samples x <= 128 tokens) and `search_rotation_config` (adaptive, paper criterion) interleaved
(ratio search / forward). Absolute times are printed and kept, and the growth of each cost with width
is expressed relative to the smallest width of the same run.

    python bench/scaling.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import interleaved, ratio  # noqa: E402

VOCAB = 2048


def build(path: str, hidden: int, layers: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                      vocab_size=VOCAB, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def load(path: str, qc=None):
    from transformers import AutoModelForCausalLM

    import hf_roste  # noqa: F401

    kw = {"quantization_config": qc} if qc is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa", **kw)


def step_fn(model, batch: int, seq: int):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def calibration(samples: int, seq: int, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
        ids = torch.randint(4, VOCAB, (n, seq), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def measure_width(hidden: int, layers: int, reps: int, batch: int, seq: int, samples: int) -> dict:
    from hf_roste import RoSTEConfig, search_rotation_config, set_rotation_config

    with tempfile.TemporaryDirectory() as path:
        build(path, hidden, layers)
        plain, roste = load(path), load(path, RoSTEConfig(rotation_search="all"))
        n_params = sum(p.numel() for p in plain.parameters())
        st = interleaved({"plain": step_fn(plain, batch, seq), "roste": step_fn(roste, batch, seq)}, reps=reps)
        del plain, roste
        gc.collect()
        model = load(path, RoSTEConfig()).eval()
    batches = calibration(samples, seq)
    all_off = {"R1": True, "layers": [{"R2": False, "R3": False, "R4": False} for _ in range(layers)]}

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model(**b, use_cache=False)

    def search() -> None:
        search_rotation_config(model, batches, strategy="adaptive", criterion="paper")

    forward()
    times: dict[str, list[float]] = {"forward": [], "search": []}
    for _ in range(reps):
        for name, fn in (("forward", forward), ("search", search)):
            if name == "search":
                set_rotation_config(model, all_off, record=False)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    fwd, srch = statistics.median(times["forward"]), statistics.median(times["search"])
    r = ratio(st, "roste", "plain")
    return {"hidden": hidden, "layers": layers, "parameters": n_params,
            "plain_step_s": st["plain"]["median"], "roste_step_s": st["roste"]["median"],
            "step_ratio": r["median"], "step_ratio_min": r["min"], "step_ratio_max": r["max"],
            "forward_s": fwd, "search_s": srch, "search_ratio": srch / fwd,
            "search_ratio_min": min(times["search"]) / max(times["forward"]),
            "search_ratio_max": max(times["search"]) / min(times["forward"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    widths = (64, 128, 256) if args.quick else (256, 512, 1024)
    layers = 2 if args.quick else 4
    reps = args.reps or (2 if args.quick else 3)
    batch, seq, samples = (2, 32, 4) if args.quick else (2, 128, 8)
    rows = [measure_width(h, layers, reps, batch, seq, samples) for h in widths]
    base = rows[0]
    for r in rows:
        r["plain_step_growth"] = r["plain_step_s"] / base["plain_step_s"]
        r["roste_step_growth"] = r["roste_step_s"] / base["plain_step_s"]
        r["search_growth"] = r["search_s"] / base["search_s"]
        r["param_growth"] = r["parameters"] / base["parameters"]
    print(f"{layers} layers, batch {batch} x {seq}, calibration {samples} samples, {reps} interleaved reps, 2 threads")
    print(f"{'hidden':>6s} {'params':>10s} {'plain ms':>9s} {'RoSTE ms':>9s} {'ratio':>6s} {'fwd ms':>8s} "
          f"{'search ms':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['hidden']:>6d} {r['parameters']:>10,d} {1e3 * r['plain_step_s']:9.1f} {1e3 * r['roste_step_s']:9.1f} "
              f"{r['step_ratio']:6.2f} {1e3 * r['forward_s']:8.1f} {1e3 * r['search_s']:9.1f} {r['search_ratio']:6.2f}")
    print(json.dumps({"widths": rows, "layers": layers, "batch": batch, "seq": seq, "calibration_samples": samples,
                      "reps": reps, "shape": "quick" if args.quick else "full"}))


if __name__ == "__main__":
    main()
