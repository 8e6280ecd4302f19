"""Cost of the RoSTE rotation search relative to one forward pass over the same calibration set.

Usage::

    /work/venv/bin/python bench/search.py [--quick] [--reps N] [--samples N] [--seq N]

Model: randomly initialised Llama (hidden 512, 6 layers, intermediate 2048, 8 heads / 8 KV heads,
vocab 32000), fp32, W4A4KV4, loaded through `from_pretrained(..., RoSTEConfig())`. Calibration:
`--samples` rows of random token ids with lengths drawn in [seq/2, seq] (right padding), batch 8.

Timed (interleaved repetitions, medians and min-max): one forward pass of the QAT model (quantization
on, no cache) over the calibration set (the reference), the same with quantization off, and
`search_rotation_config` with strategy adaptive (criterion paper and output), and with `--layerwise`
strategy layerwise (one repetition, after the others). Before
each search the model is reset to all rotations off. The last line is a JSON object with
`search_time_ratio` (adaptive, paper criterion / reference forward) and every other figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from hf_roste import (  # noqa: E402
    RoSTEConfig,
    search_rotation_config,
    set_quantization_enabled,
    set_rotation_config,
)


def build(path: str, quick: bool = False) -> None:
    torch.manual_seed(0)
    width, layers = (256, 2) if quick else (512, 6)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=width // 64, num_key_value_heads=width // 64, vocab_size=32000,
                      max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def calibration(samples: int, seq: int, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
        ids = torch.randint(0, 32000, (n, seq), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@torch.no_grad()
def forward_pass(model, batches) -> None:
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer samples and repetitions")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="calibration length (default 128; quick 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layerwise", action="store_true", help="also time strategy='layerwise' once (slow)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 3)
    samples = args.samples or (4 if args.quick else 16)
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, quick=args.quick)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=RoSTEConfig(), dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
    batches = calibration(samples, args.seq or (64 if args.quick else 128))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    n_layers = len(model.model.layers)
    all_off = {"R1": True, "layers": [{"R2": False, "R3": False, "R4": False} for _ in range(n_layers)]}

    def reset():
        set_rotation_config(model, all_off, record=False)

    def fwd_q():
        forward_pass(model, batches)

    def fwd_fp():
        set_quantization_enabled(model, False)
        forward_pass(model, batches)
        set_quantization_enabled(model, True)

    results = {}

    def search(strategy, criterion):
        def run():
            results[(strategy, criterion)] = search_rotation_config(model, batches, strategy=strategy,
                                                                    criterion=criterion)
        return run

    cases = {"forward_quant": (fwd_q, None), "forward_fp": (fwd_fp, None),
             "adaptive_paper": (search("adaptive", "paper"), reset),
             "adaptive_output": (search("adaptive", "output"), reset)}
    fwd_q()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, (fn, before) in cases.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if args.layerwise:  # one repetition: 3 + 3 * layers quantized evaluations
        reset()
        t0 = time.perf_counter()
        search("layerwise", "paper")()
        times["layerwise_paper"] = [time.perf_counter() - t0]
    ref = statistics.median(times["forward_quant"])
    print(f"Llama hidden 512, 6 layers, intermediate 2048, vocab 32000, fp32, W4A4KV4, sdpa; {args.threads} threads")
    print(f"calibration: {samples} samples x <= {args.seq} tokens ({tokens} real tokens), batch 8; "
          f"{reps} interleaved reps, medians")
    print(f"{'case':18s} {'median s':>9s} {'min-max s':>15s} {'ratio to forward':>17s}")
    out = {"model": "llama-h512-l6-i2048", "samples": samples, "seq": args.seq, "tokens": tokens,
           "threads": args.threads, "reps": reps, "forward_seconds": round(ref, 4)}
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18s} {med:9.3f} {min(ts):7.3f}-{max(ts):<7.3f} {med / ref:17.2f}")
        out[f"{name}_ratio"] = round(med / ref, 3)
        out[f"{name}_spread"] = [round(min(ts) / ref, 3), round(max(ts) / ref, 3)]
    out["search_time_ratio"] = out["adaptive_paper_ratio"]
    for (strategy, criterion), r in results.items():
        key = f"{strategy}_{criterion}"
        out[f"{key}_layers_on"] = {n: sum(f[n] for f in r.layers) for n in ("R2", "R3", "R4")}
        out[f"{key}_totals"] = {k: round(v, 6) for k, v in r.totals.items()}
        if r.whole_model:
            out[f"{key}_whole_model_kl"] = {k: round(v, 8) for k, v in r.whole_model.items()}
    print(results[("adaptive", "paper")].to_markdown())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
