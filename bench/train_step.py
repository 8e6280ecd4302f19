"""Training-step cost of RoSTE W4A4KV4 (all rotations on) relative to plain fp32 training.

Same model, same batch, one process, interleaved repetitions. Also the peer torchao QAT (int8
per-token activations, int4 group-32 weights), when torchao imports. Default shape (issue 3): Llama,
hidden 512, 6 layers, intermediate 2048, batch 4 x 256, 2 threads. Also reports STE (no
rotations) and peak-memory ratios (measured in separate child processes, so each figure is the
peak of one variant alone). Last line: JSON with `step_time_ratio` and `peak_memory_ratio`.

    python bench/train_step.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import emit, interleaved, ratio  # noqa: E402

SHAPES = {
    "full": dict(hidden=512, layers=6, inter=2048, heads=8, kv_heads=8, batch=4, seq=256),
    "quick": dict(hidden=128, layers=2, inter=512, heads=2, kv_heads=2, batch=2, seq=64),
}


def build(variant: str, shape: dict, base_dir: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_roste  # noqa: F401
    from hf_roste import RoSTEConfig

    if not os.path.exists(os.path.join(base_dir, "config.json")):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                          num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], vocab_size=2048, max_position_embeddings=1024)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(base_dir)
    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa")
    if variant == "plain":
        return AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if variant == "torchao":
        return torchao_qat(AutoModelForCausalLM.from_pretrained(base_dir, **kwargs))
    if variant == "roste":
        q = RoSTEConfig(rotation_search="all")
    elif variant == "ste":
        q = RoSTEConfig(rotations=(), rotation_search="none")
    else:
        raise ValueError(variant)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, **kwargs)


def torchao_available() -> bool:
    try:
        import torchao.quantization.qat  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or incompatible with this torch: the variant is skipped
        return False
    return True


def torchao_qat(model):
    """The peer: torchao QAT (int8 per-token asymmetric activations, int4 group-32 symmetric weights)
    on every linear of the decoder blocks (embeddings and lm_head stay full precision, as in RoSTE)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32)
    quantize_(model.model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model


def make_step(model, shape: dict):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (shape["batch"], shape["seq"]), generator=g)

    def step() -> None:
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_rss_children(variants, shape_name: str, base_dir: str) -> dict[str, int]:
    """Peak resident memory (bytes) of a fresh process per variant doing 3 steps of it. The processes
    run concurrently (each one's high-water mark is its own; only wall time is shared)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # peak RSS of the training steps alone: reset the high-water mark after building and one warm-up step
    code = (
        f"import sys, torch; torch.set_num_threads(2); sys.path.insert(0, {root!r});"
        "from bench.train_step import build, make_step, SHAPES;"
        f"s = SHAPES[{shape_name!r}]; m = build('__VARIANT__', s, {base_dir!r}); st = make_step(m, s); st();"
        "open('/proc/self/clear_refs', 'w').write('5');"
        "[st() for _ in range(3)];"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    procs = {v: subprocess.Popen([sys.executable, "-c", code.replace("__VARIANT__", v)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for v in variants}
    out = {}
    for v, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"peak-memory child for {v!r} failed:\n{stderr[-2000:]}")
        out[v] = int(stdout.strip().splitlines()[-1]) * 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, few repetitions")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    shape_name = "quick" if args.quick else "full"
    shape = SHAPES[shape_name]
    reps = args.reps or (2 if args.quick else 7)
    variants = ("plain", "roste", "ste") + (("torchao",) if torchao_available() else ())
    with tempfile.TemporaryDirectory() as base_dir:
        steps = {v: make_step(build(v, shape, base_dir), shape) for v in variants}
        stats = interleaved(steps, reps=reps, warmup=1)
        rss = peak_rss_children(variants, shape_name, base_dir)
    print(f"shape: {shape}, threads: 2, repetitions: {reps}")
    for v, s in stats.items():
        print(f"  {v:6s} step: median {s['median'] * 1e3:8.1f} ms  (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f})")
    r_roste, r_ste = ratio(stats, "roste", "plain"), ratio(stats, "ste", "plain")
    print(f"  RoSTE / plain: {r_roste['median']:.3f}  (spread {r_roste['min']:.3f}-{r_roste['max']:.3f}); target <= 1.25")
    print(f"  STE   / plain: {r_ste['median']:.3f}  (spread {r_ste['min']:.3f}-{r_ste['max']:.3f})")
    extra = {"torchao_available": "torchao" in stats}
    if "torchao" in stats:
        r_tao = ratio(stats, "torchao", "plain")
        print(f"  torchao QAT / plain: {r_tao['median']:.3f}  (spread {r_tao['min']:.3f}-{r_tao['max']:.3f}); "
              f"peak RSS {rss['torchao'] / 2**20:.0f} MiB ({rss['torchao'] / rss['plain']:.3f}x)")
        extra.update(torchao_step_time_ratio=r_tao["median"], torchao_step_time_ratio_min=r_tao["min"],
                     torchao_step_time_ratio_max=r_tao["max"], torchao_peak_memory_ratio=rss["torchao"] / rss["plain"])
    else:
        print("  torchao QAT: not importable here, skipped")
    mem_roste, mem_ste = rss["roste"] / rss["plain"], rss["ste"] / rss["plain"]
    print(f"  peak RSS: plain {rss['plain'] / 2**20:.0f} MiB, RoSTE {rss['roste'] / 2**20:.0f} MiB "
          f"({mem_roste:.3f}x; target <= 1.3), STE {rss['ste'] / 2**20:.0f} MiB ({mem_ste:.3f}x)")
    emit({"shape": shape_name, "step_time_ratio": r_roste["median"], "step_time_ratio_min": r_roste["min"],
          "step_time_ratio_max": r_roste["max"], "ste_step_time_ratio": r_ste["median"],
          "peak_memory_ratio": mem_roste, "ste_peak_memory_ratio": mem_ste,
          "plain_step_ms": stats["plain"]["median"] * 1e3, "ste_step_time_ratio_min": r_ste["min"],
          "ste_step_time_ratio_max": r_ste["max"], "reps": reps, "peak_rss_bytes": rss, **extra})


if __name__ == "__main__":
    main()
