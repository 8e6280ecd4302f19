"""Rotation ablation of QA-SFT: which rotations help, and how the learning rate changes the answer.

From the demo's base and held-out task (the same data, schedule and evaluation as `bench/quality.py`),
per seed and learning rate, QA-SFT at one quantization setting with:

- `ste`: no rotation (norms not folded), i.e. plain STE;
- `r1`: norms folded and the residual rotation R1 only;
- `all`: R1 and R2 / R3 / R4 in every layer (`rotation_search="all"`);
- `adaptive`: the paper's adaptive search (RoSTE);
- `adaptive_output`: the adaptive search with `rotation_search_criterion="output"`.

Each variant is paired with `ste` of the same seed and learning rate (same data order), and the noise
rule of `bench/quality.py` says whether the mean difference exceeds seed noise. The per-seed spread of
each variant is reported as well: it shows how stable the fine-tuning is at that learning rate.

This is not part of the default suite (`python -m bench`): at full size it takes about 15 minutes on
2 cores. `--markdown PATH` writes the tables as Markdown. The last output line is a JSON object.

    python bench/rotation_ablation.py [--quick] [--seeds N] [--learning-rates LR ...] [--scheme W3A3KV3]
                                      [--steps N] [--variants NAME ...] [--jobs N] [--markdown PATH]
    python bench/rotation_ablation.py --render-from RESULT.json --markdown PATH
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import run_workers  # noqa: E402
from bench.quality import SCHEMES, _stats, _train_qa, roste_config, task_setup  # noqa: E402

VARIANTS = {
    "ste": "STE (no rotation)",
    "r1": "R1 only (norms folded)",
    "all": "all rotations on",
    "adaptive": "RoSTE (adaptive, paper criterion)",
    "adaptive_output": "RoSTE (adaptive, output criterion)",
}
FULL = dict(seeds=8, steps=160, batch_size=16, learning_rates=[2e-3, 1e-3], train_examples=1000, eval_prompts=1000,
            calibration_samples=16, scheme="W3A3KV3", variants=list(VARIANTS))
QUICK = dict(seeds=2, steps=3, batch_size=8, learning_rates=[1e-3], train_examples=64, eval_prompts=48,
             calibration_samples=4, scheme="W4A4KV4", variants=["ste", "adaptive"])


def variant_config(scheme: str, variant: str):
    """The `RoSTEConfig` and search criterion of one ablation variant."""
    from hf_roste import RoSTEConfig

    if variant == "r1":
        w, a, kv = SCHEMES[scheme]
        return RoSTEConfig(rotations=("R1",), rotation_search="none", weight_bits=w, activation_bits=a,
                           kv_bits=kv), "paper"
    kinds = {"ste": "none", "all": "all", "adaptive": "adaptive", "adaptive_output": "adaptive"}
    if variant not in kinds:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    return roste_config(scheme, kinds[variant]), ("output" if variant == "adaptive_output" else "paper")


def run_one(seed: int, lr: float, settings: dict, workdir: str) -> list[dict]:
    """Every variant of one (seed, learning rate); one row each."""
    from hf_roste.demo.run import evaluate, shipped_base_path

    s, tok, eval_pairs, train_ds, _ = task_setup(dict(settings, seeds=1, learning_rate=lr), workdir)
    rows = []
    for variant in settings["variants"]:
        qc, criterion = variant_config(settings["scheme"], variant)
        out = Path(workdir) / f"lr{lr:g}_seed{seed}_{variant}"
        model, secs, on = _train_qa(s, shipped_base_path(), train_ds, tok, out, seed, qc, criterion)
        m = evaluate(model, eval_pairs, desc=variant)
        rows.append({"seed": seed, "learning_rate": lr, "variant": variant, "completion_loss": m["completion_loss"],
                     "exact_match": m["exact_match"], "train_seconds": secs, "rotations_on": on})
        print(f"lr {lr:g} seed {seed} {variant:16s} loss {m['completion_loss']:.4f} EM {m['exact_match']:.3f} "
              f"train {secs:.1f}s", flush=True)
        del model
    return rows


def aggregate(runs: list[dict], settings: dict) -> list[dict]:
    """Per learning rate and variant: mean, per-seed spread, and the paired difference against `ste`."""
    out = []
    for lr in settings["learning_rates"]:
        by = {(r["seed"], r["variant"]): r for r in runs if r["learning_rate"] == lr}
        seeds = sorted({s for s, _ in by})
        for variant in settings["variants"]:
            rs = [by[(s, variant)] for s in seeds if (s, variant) in by]
            if not rs:
                continue
            losses = [r["completion_loss"] for r in rs]
            row = {"learning_rate": lr, "variant": variant, "label": VARIANTS[variant], "seeds": len(rs),
                   "completion_loss": {"mean": sum(losses) / len(losses), "per_seed": losses},
                   "exact_match": sum(r["exact_match"] for r in rs) / len(rs),
                   "completion_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None}
            if variant != "ste":
                paired = [s for s in seeds if (s, variant) in by and (s, "ste") in by]
                if paired:
                    row["vs_ste"] = _stats([by[(s, variant)]["completion_loss"] - by[(s, "ste")]["completion_loss"]
                                            for s in paired])
            on = [r["rotations_on"] for r in rs if r.get("rotations_on")]
            if on:
                row["rotations_on_per_seed"] = on
            out.append(row)
    return out


def markdown(result: dict) -> str:
    """The ablation's tables, generated from its JSON."""
    s = result["settings"]
    lines = [
        "# Rotation ablation of QA-SFT",
        "",
        "<!-- generated by bench/rotation_ablation.py --markdown; do not edit by hand -->",
        "",
        f"QA-SFT of the demo's base on its held-out task at {s['scheme']} (asymmetric, clip 0.95), "
        f"{s['steps']} steps x batch {s['batch_size']} (cosine), {s['train_examples']} training examples, "
        f"{s['seeds']} seeds, evaluated on {s['eval_prompts']} held-out prompts (completion loss, greedy exact "
        f"match). Each variant is paired with STE of the same seed and learning rate. Wall time "
        f"{result['wall_seconds']:.0f} s. Command: `{result['command']}`.",
        "",
        f"Noise rule: {result['noise_rule']}",
        "",
    ]
    for lr in s["learning_rates"]:
        lines += [f"## learning rate {lr:g}", "",
                  "| variant | completion loss (mean) | sd over seeds | exact match % | Δ loss vs STE, mean [min, max] "
                  "| 2 SE | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if r["learning_rate"] != lr:
                continue
            sd = "-" if r["completion_loss_sd"] is None else f"{r['completion_loss_sd']:.4f}"
            d = r.get("vs_ste")
            if d:
                se = "-" if d["se"] is None else f"{2 * d['se']:.4f}"
                diff = f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}] | {se} | {d['verdict']}"
            else:
                diff = "- | - | -"
            lines.append(f"| {r['label']} | {r['completion_loss']['mean']:.4f} | {sd} | "
                         f"{100 * r['exact_match']:.1f} | {diff} |")
        beyond = [f"{r['label']} {r['vs_ste']['mean']:+.4f}" for r in result["rows"]
                  if r["learning_rate"] == lr and r.get("vs_ste") and r["vs_ste"]["verdict"] == "beyond noise"]
        lines += ["", "Differences from STE beyond seed noise at this learning rate: "
                  + ("; ".join(beyond) if beyond else "none") + ".", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--learning-rates", type=float, nargs="+")
    p.add_argument("--scheme", choices=list(SCHEMES))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="(seed, learning rate) runs in parallel processes")
    p.add_argument("--markdown", default=None, help="write the tables as Markdown to this path")
    p.add_argument("--render-from", default=None, metavar="JSON",
                   help="only re-render --markdown from a saved result (the JSON line this script prints last)")
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_settings", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._run is not None:  # worker: one (seed, learning rate)
        torch.set_num_threads(1)
        seed, lr = args._run.split(":")
        print("ROWS " + json.dumps(run_one(int(seed), float(lr), json.loads(args._settings), args._workdir)))
        return
    if args.render_from:
        if not args.markdown:
            p.error("--render-from needs --markdown PATH")
        lines = Path(args.render_from).read_text().strip().splitlines()
        Path(args.markdown).write_text(markdown(json.loads(lines[-1])))
        return
    settings = dict(QUICK if args.quick else FULL)
    for k in ("seeds", "steps", "learning_rates", "scheme", "variants"):
        if getattr(args, k) is not None:
            settings[k] = getattr(args, k)
    if "ste" not in settings["variants"]:
        settings["variants"] = ["ste", *settings["variants"]]  # the paired baseline
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        jobs = [(f"seed {seed} lr {lr:g}", [os.path.abspath(__file__), "--_run", f"{seed}:{lr!r}", "--_settings",
                                             json.dumps(settings), "--_workdir", work])
                for lr in settings["learning_rates"] for seed in range(settings["seeds"])]
        runs = run_workers(jobs, args.jobs, ("lr ",), "rotation ablation")
    from bench.quality import NOISE_RULE

    result = {"settings": settings, "runs": runs, "rows": aggregate(runs, settings), "noise_rule": NOISE_RULE,
              "wall_seconds": time.perf_counter() - t0,
              "command": " ".join(["python bench/rotation_ablation.py", *sys.argv[1:]])}
    text = markdown(result)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
