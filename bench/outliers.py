"""Per-layer outlier statistics at every quantized linear input, before and after rotation.

For each base, on calibration text (held-out task examples and pretraining-mix sequences of the demo),
the input of each quantized linear of every decoder layer is recorded:

- before rotation: the plain full-precision model (`q_proj` input = k/v input, `o_proj`, `gate_proj` =
  `up_proj` input, `down_proj`), exactly what round-to-nearest quantizes;
- after rotation: the same base loaded with `RoSTEConfig(rotation_search="all")` (norms folded, R1 fused,
  R2 fused into v/o, online R4 applied to the `down_proj` input) with quantization switched off, i.e.
  the tensor the per-token quantizer sees.

Per token t, r_t = max_i |x_ti| / median_i |x_ti|. Reported per layer and module: the median of r_t over
tokens ("typical") and its maximum ("worst"). Rows of padding are never included. Bases: the demo's
shipped base, the code-corpus base `bench/bases/code_base` when present (`<bos>` is put first in every
sequence of a base pre-trained with it, as in its pre-training), and, as a reference, a randomly initialised
model of the demo base's shape (no training).

    python bench/outliers.py [--quick] [--base PATH ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODULES = ("q_proj", "o_proj", "gate_proj", "down_proj")
CODE_BASE = os.path.join(ROOT, "bench", "bases", "code_base")


def calibration(n_task: int, n_pretrain: int) -> list[torch.Tensor]:
    from hf_roste.demo.run import DATA_SEED
    from hf_roste.demo.tasks import EOS_ID, PAD_ID, encode, held_out_split, pretrain_sequence

    seqs = [torch.tensor([encode(p + c) + [EOS_ID]]) for p, c in held_out_split(n_task, DATA_SEED + 7)]
    rng = random.Random(7)
    for _ in range(n_pretrain):
        ids = pretrain_sequence(rng, 64)
        while ids and ids[-1] == PAD_ID:
            ids.pop()
        seqs.append(torch.tensor([ids]))
    return seqs


def _ratios(x: torch.Tensor) -> torch.Tensor:
    a = x.detach().float().abs().reshape(-1, x.shape[-1])
    return a.amax(-1) / a.median(-1).values.clamp_min(1e-12)


@torch.no_grad()
def collect(model, seqs, rotated: bool) -> dict[str, dict[str, float]]:
    from hf_roste.numerics.hadamard import hadamard_transform

    store: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        for name in MODULES:
            parent = layer.self_attn if name in ("q_proj", "o_proj") else layer.mlp
            mod = getattr(parent, name)
            key = f"{li}.{name}"

            def hook(m, args, key=key):
                x = args[0]
                if rotated and getattr(m, "input_hadamard", False):
                    x = hadamard_transform(x)
                store.setdefault(key, []).append(_ratios(x))

            hooks.append(mod.register_forward_pre_hook(hook))
    model.eval()
    for ids in seqs:
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for key, rs in store.items():
        r = torch.cat(rs)
        out[key] = {"median": float(r.median()), "max": float(r.max()), "tokens": int(r.numel())}
    return out


def analyse(path: str, seqs) -> dict:
    from transformers import AutoModelForCausalLM

    import hf_roste  # noqa: F401
    from hf_roste import RoSTEConfig, set_quantization_enabled

    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    before = collect(plain, seqs, rotated=False)
    rot = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                               quantization_config=RoSTEConfig(rotation_search="all"))
    set_quantization_enabled(rot, False)
    after = collect(rot, seqs, rotated=True)
    layers = []
    for li in range(len(plain.model.layers)):
        row = {"layer": li}
        for name in MODULES:
            k = f"{li}.{name}"
            row[name] = {"before": before[k], "after": after[k]}
        layers.append(row)
    summary = {}
    for name in MODULES:
        summary[name] = {
            "before_median": max(r[name]["before"]["median"] for r in layers),
            "before_max": max(r[name]["before"]["max"] for r in layers),
            "after_median": max(r[name]["after"]["median"] for r in layers),
            "after_max": max(r[name]["after"]["max"] for r in layers),
        }
    return {"layers": layers, "summary_worst_layer": summary}


def random_twin(path: str, out_dir: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(path)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--base", nargs="*", default=None, help="bases to analyse (default: the demo's shipped base and bench/bases/code_base)")
    args = p.parse_args()
    torch.set_num_threads(2)
    from bench.quality import base_uses_bos
    from hf_roste.demo.run import shipped_base_path
    from hf_roste.demo.tasks import BOS_ID

    bases = args.base or [str(shipped_base_path())] + ([CODE_BASE] if os.path.isfile(os.path.join(CODE_BASE, "config.json"))
                                                       else [])
    seqs = calibration(12 if args.quick else 256, 4 if args.quick else 64)
    tokens = sum(s.numel() for s in seqs)
    results, bos = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        named = {os.path.basename(os.path.normpath(b)) or b: b for b in bases}
        named["random-init twin of " + next(iter(named))] = random_twin(next(iter(named.values())), tmp)
        for name, path in named.items():
            bos[name] = base_uses_bos(path)
            base_seqs = [torch.cat([torch.tensor([[BOS_ID]]), s], dim=1) for s in seqs] if bos[name] else seqs
            results[name] = analyse(path, base_seqs)
            results[name]["bos"] = bos[name]
    print(f"calibration: {len(seqs)} sequences, {tokens} tokens (held-out task + pretraining mix); "
          f"<bos> prepended for: {', '.join(n for n, b in bos.items() if b) or 'none'}")
    print("max/median of |x| per token: median over tokens / max over tokens, before -> after rotation")
    for name, res in results.items():
        print(f"\nbase: {name}")
        print(f"{'layer':>5s} " + " ".join(f"{m:>30s}" for m in MODULES))
        for row in res["layers"]:
            cells = []
            for m in MODULES:
                b, a = row[m]["before"], row[m]["after"]
                cells.append(f"{b['median']:6.1f}/{b['max']:6.1f} -> {a['median']:5.1f}/{a['max']:6.1f}")
            print(f"{row['layer']:>5d} " + " ".join(f"{c:>30s}" for c in cells))
    print(json.dumps({"bases": results, "calibration_tokens": tokens, "calibration_sequences": len(seqs),
                      "modules": list(MODULES)}))


if __name__ == "__main__":
    main()
