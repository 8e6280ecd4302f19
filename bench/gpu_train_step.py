"""GPU training-step cost of RoSTE W4A4KV4 (all rotations on) relative to plain training (issue 18).

CUDA only. Two shapes, random init: Qwen2.5-0.5B (hidden 896, intermediate 4864, 24 layers, 14
heads, 2 KV heads, vocab 151936, tied; batch 8 x 1024) and the Qwen2.5-7B width with 4 layers
(hidden 3584, intermediate 18944, 28 heads, 4 KV heads, vocab 32000; batch 4 x 1024). fp32 master
weights, bf16 autocast, fused AdamW, sdpa. Variants: plain, STE W4A4KV4 (no rotations), RoSTE
W4A4KV4 (all rotations on), each eager and ``torch.compile``d, and torchao QAT (int8 per-token
activations, int4 group-32 weights) as the peer when it imports. Step times are medians of
interleaved repetitions with every model resident; peak memory is measured per variant with only
that variant's model resident (``torch.cuda.max_memory_allocated`` over eager steps after a warm-up).
Last line: JSON with ``step_time_ratio_0_5b``, ``step_time_ratio_7b_width``,
``compiled_step_time_ratio_0_5b``, ``peak_memory_ratio_0_5b`` and ``gpu``.

Without CUDA it prints ``{"skipped": "no CUDA device", ...}`` and exits 0. ``--dry`` runs the whole
script on tiny shapes on CPU (``aot_eager`` compile, bf16 autocast on CPU) so it can be tested
anywhere; its figures mean nothing about a GPU.

    python bench/gpu_train_step.py [--reps N] [--shapes 0_5b,7b_width] [--no-compile] [--dry]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import emit, interleaved, ratio  # noqa: E402
from bench.train_step import torchao_available, torchao_qat  # noqa: E402

SHAPES = {
    "0_5b": dict(hidden=896, inter=4864, layers=24, heads=14, kv_heads=2, vocab=151936, tied=True, batch=8, seq=1024),
    "7b_width": dict(hidden=3584, inter=18944, layers=4, heads=28, kv_heads=4, vocab=32000, tied=False, batch=4,
                     seq=1024),
}
# --dry: the same structure (non-power-of-two hidden / head_dim / intermediate, GQA, multiples of
# torchao's group size 32) at toy size
DRY_SHAPES = {
    "0_5b": dict(hidden=224, inter=608, layers=2, heads=4, kv_heads=2, vocab=512, tied=True, batch=2, seq=32),
    "7b_width": dict(hidden=192, inter=320, layers=2, heads=4, kv_heads=2, vocab=256, tied=False, batch=2, seq=32),
}
BASE_VARIANTS = ("plain", "ste", "roste")


def save_base(shape: dict, directory: str) -> str:
    """A randomly initialised Qwen2 checkpoint of ``shape`` (fp32) in ``directory``."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      tie_word_embeddings=shape["tied"], max_position_embeddings=max(2048, shape["seq"]))
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)
    return directory


def build(variant: str, base_dir: str, device: str):
    """The model of ``variant`` (plain, ste, roste, torchao) on ``device``, fp32 master weights."""
    from transformers import AutoModelForCausalLM

    from hf_roste import RoSTEConfig

    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa", device_map=device)
    if variant == "plain":
        return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if variant == "torchao":
        return torchao_qat(AutoModelForCausalLM.from_pretrained(base_dir, **kwargs))
    bits = dict(weight_bits=4, activation_bits=4, kv_bits=4)
    if variant == "roste":
        q = RoSTEConfig(rotation_search="all", **bits)
    elif variant == "ste":
        q = RoSTEConfig(rotations=(), rotation_search="none", **bits)
    else:
        raise ValueError(f"unknown variant {variant!r}: use one of plain, ste, roste, torchao")
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, **kwargs)


def make_step(model, shape: dict, device: str, compiled: bool, backend: str):
    """One optimizer step (forward under bf16 autocast, backward, fused AdamW) on a fixed random batch."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(device)
    forward = torch.compile(model, backend=backend) if compiled else model

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def peak_memory_alone(variant: str, base_dir: str, shape: dict, device: str, backend: str) -> int | None:
    """Peak allocated bytes of ``variant``'s eager steps with only its model resident (None on CPU)."""
    model = build(variant, base_dir, device)
    step = make_step(model, shape, device, False, backend)
    step()  # warm-up
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        peak = torch.cuda.max_memory_allocated()
    else:
        step()
    del step, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return peak


def run_shape(name: str, shape: dict, device: str, reps: int, compile_too: bool, backend: str) -> dict:
    variants = list(BASE_VARIANTS) + (["torchao"] if torchao_available() else [])
    timed = variants + ([f"{v}_compiled" for v in BASE_VARIANTS] if compile_too else [])
    with tempfile.TemporaryDirectory() as base_dir:
        save_base(shape, base_dir)
        memory = {v: peak_memory_alone(v, base_dir, shape, device, backend) for v in variants}
        models = {v: build(v, base_dir, device) for v in variants}
        steps = {}
        for v in timed:
            base = v.removesuffix("_compiled")
            steps[v] = make_step(models[base], shape, device, v.endswith("_compiled"), backend)
        t0 = time.perf_counter()
        stats = interleaved(steps, reps=reps, warmup=2)
        wall = time.perf_counter() - t0
        del steps, models
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"[{name}] {shape}; {reps} interleaved repetitions ({wall:.0f} s with warm-up)")
    for v, s in stats.items():
        mem = memory.get(v)
        mem_txt = f", peak alone {mem / 2**30:.2f} GiB" if mem is not None else ""
        print(f"  {v:16s} median {s['median'] * 1e3:9.1f} ms (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f})"
              f"{mem_txt}")
    out = {"plain_step_ms": stats["plain"]["median"] * 1e3, "reps": reps}
    for v in timed:
        if v == "plain":
            continue
        den = "plain_compiled" if v.endswith("_compiled") else "plain"
        if v == den:
            continue
        r = ratio(stats, v, den)
        out[f"{v}_step_time_ratio"] = r["median"]
        out[f"{v}_step_time_ratio_spread"] = [r["min"], r["max"]]
        print(f"  {v} / {den}: {r['median']:.3f} (spread {r['min']:.3f}-{r['max']:.3f})")
    if compile_too:
        out["plain_compiled_vs_eager"] = stats["plain_compiled"]["median"] / stats["plain"]["median"]
    if memory.get("plain"):
        out["peak_memory_bytes"] = memory
        out["peak_memory_ratio"] = {v: m / memory["plain"] for v, m in memory.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7, --dry 1)")
    parser.add_argument("--shapes", default="0_5b,7b_width", help="comma-separated subset of: 0_5b, 7b_width")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU, to test the script itself")
    args = parser.parse_args()
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}: use a comma-separated subset of {', '.join(SHAPES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "NO")  # hub kernels need the network (see the README)
    if not args.dry and not torch.cuda.is_available():
        emit({"skipped": "no CUDA device", "gpu": None, "torch": torch.__version__})
        return
    device = "cpu" if args.dry else "cuda"
    backend = "aot_eager" if args.dry else "inductor"
    reps = args.reps or (1 if args.dry else 7)
    shapes = DRY_SHAPES if args.dry else SHAPES
    gpu = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    print(f"device: {gpu}, torch {torch.__version__}, compile backend {backend}")
    results = {name: run_shape(name, shapes[name], device, reps, not args.no_compile, backend) for name in names}
    figures = {"gpu": gpu, "dry": args.dry, "torch": torch.__version__, "results": results}
    for key, res in results.items():
        figures[f"step_time_ratio_{key}"] = res["roste_step_time_ratio"]
        figures[f"ste_step_time_ratio_{key}"] = res["ste_step_time_ratio"]
        if "roste_compiled_step_time_ratio" in res:
            figures[f"compiled_step_time_ratio_{key}"] = res["roste_compiled_step_time_ratio"]
        if "torchao_step_time_ratio" in res:
            figures[f"torchao_step_time_ratio_{key}"] = res["torchao_step_time_ratio"]
        if "peak_memory_ratio" in res:
            figures[f"peak_memory_ratio_{key}"] = res["peak_memory_ratio"]["roste"]
    emit(figures)


if __name__ == "__main__":
    main()
