"""Aggregation over seeds (paired against FP SFT), the printed table and conclusions, JSON / Markdown / SVG outputs."""

from __future__ import annotations

import json
from pathlib import Path

from .conclusions import NOISE_RULE, conclusion_line, conclusions, paired

#: Row labels of the comparison table, per method of `run.METHODS`.
METHOD_LABELS = {
    "fp_sft": "FP SFT",
    "sft_rtn": "SFT + RTN",
    "sft_rot_rtn": "SFT + rotation + RTN (QuaRot-style)",
    "ste": "STE QA-SFT",
    "roste": "RoSTE QA-SFT (adaptive)",
}


def aggregate(runs: list[dict], settings) -> tuple[list[dict], str]:
    """One row per (setting, method): means and per-seed values, paired differences against FP SFT."""
    rows = []
    keys = [("FP", "fp_sft")] + [(sc, m) for sc in settings.schemes for m in ("sft_rtn", "sft_rot_rtn", "ste", "roste")]
    for scheme, method in keys:
        rs = [r for r in runs if r["scheme"] == scheme and r["method"] == method]
        row = {"scheme": scheme, "method": method, "label": METHOD_LABELS[method], "seeds": len(rs)}
        for key in ("completion_loss", "exact_match", "checkpoint_bytes", "train_seconds"):
            vals = [float(r[key]) for r in rs]
            row[key] = sum(vals) / len(vals)
            row[f"{key}_per_seed"] = vals
        if method != "fp_sft":
            row["vs_fp_sft"] = {k: paired(runs, scheme, method, "FP", "fp_sft", k)
                                for k in ("completion_loss", "exact_match")}
        rot = [r.get("rotation_config") for r in rs if r.get("rotation_config")]
        if rot:
            row["rotation_config_per_seed"] = rot
        rows.append(row)
    return rows, NOISE_RULE


def add_conclusions(result: dict) -> list[dict]:
    """Compute (once) and return `result["conclusions"]` from the run's per-seed rows."""
    if "conclusions" not in result:
        labels = {r["method"]: r["label"] for r in result["rows"]}
        result["conclusions"] = conclusions(result["runs"], result["settings"]["schemes"], labels)
    return result["conclusions"]


def _fmt_diff(st: dict, pct: bool) -> str:
    if pct:
        s = f"{100 * st['mean']:+.1f}"
        return s + (f" ±{200 * st['se']:.1f}" if st["se"] is not None else "")
    s = f"{st['mean']:+.4f}"
    return s + (f" ±{2 * st['se']:.4f}" if st["se"] is not None else "")


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    header = ["setting", "method", "compl. loss", "Δloss vs FP (±2SE)", "", "exact match %", "ΔEM pts vs FP (±2SE)", "",
              "ckpt MB", "train s"]
    body = []
    for r in result["rows"]:
        d = r.get("vs_fp_sft")
        body.append([
            r["scheme"], r["label"], f"{r['completion_loss']:.4f}",
            _fmt_diff(d["completion_loss"], False) if d else "-", d["completion_loss"]["verdict"] if d else "",
            f"{100 * r['exact_match']:.1f}", _fmt_diff(d["exact_match"], True) if d else "-",
            d["exact_match"]["verdict"] if d else "",
            f"{r['checkpoint_bytes'] / 1e6:.2f}", f"{r['train_seconds']:.1f}" if r["train_seconds"] else "0 (PTQ)",
        ])
    return header, body


def print_table(result: dict) -> None:
    header, body = table_rows(result)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    n = result["settings"]["seeds"]
    print(f"\nResults: mean over {n} seed(s); {result['task']['eval_prompts']} held-out prompts; differences paired "
          "against FP SFT of the same seed")
    print(line.format(*header))
    print(line.format(*["-" * w for w in widths]))
    for b in body:
        print(line.format(*b))
    print(f"\nNoise rule: {result['noise_rule']}")
    add_conclusions(result)
    for chk in result["reload_checks"]:
        print(f"Reload check (seed {chk['seed']}, {chk['scheme']}): save_pretrained -> {chk['checkpoint_bytes']:,} bytes "
              f"({len(chk['files'])} files), from_pretrained greedy generations identical on "
              f"{chk['identical_generations']}/{chk['prompts']} prompts")


def to_markdown(result: dict) -> str:
    header, body = table_rows(result)
    s = result["settings"]
    lines = [
        "# hf-roste demo results",
        "",
        f"Base: `{result['base']['path']}` ({result['base']['parameters']:,} parameters, Llama-shaped, pre-trained "
        f"in full precision). Task: {result['task']['description']}; {result['task']['train_examples']} training "
        f"examples, {result['task']['eval_prompts']} held-out prompts. Seeds: {s['seeds']}, steps: {s['steps']}, "
        f"batch: {s['batch_size']}, lr: {s['learning_rate']}, calibration samples: {s['calibration_samples']}. "
        f"Wall time: {result['wall_seconds']:.1f}s.",
        "",
        *[line.strip() for line in result["headline"]["why"]],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", f"Noise rule: {result['noise_rule']}", "", "Conclusions (each derived from the paired differences "
              "on its line):", ""]
    lines += [f"- {conclusion_line(c)}" for c in add_conclusions(result)]
    if result.get("outliers"):
        lines += ["", "Outliers of the FP SFT model (seed 0) at the quantized linears' inputs: per token max|x| / "
                  "median|x|, typical (median over tokens) / worst (max), before -> after all rotations:", "",
                  "| layer | q_proj | o_proj | gate_proj | down_proj |", "|---|---|---|---|---|"]
        for r in result["outliers"]:
            cells = [f"{r[m]['before']['median']:.1f} / {r[m]['before']['max']:.1f} -> "
                     f"{r[m]['after']['median']:.1f} / {r[m]['after']['max']:.1f}"
                     for m in ("q_proj", "o_proj", "gate_proj", "down_proj")]
            lines.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
    lines.append("")
    for chk in result["reload_checks"]:
        lines.append(f"Reload check (seed {chk['seed']}, {chk['scheme']}): {chk['checkpoint_bytes']:,} bytes, files "
                     + ", ".join(f"`{f['file']}` ({f['bytes']:,} B)" for f in chk["files"])
                     + f"; greedy generations identical on {chk['identical_generations']}/{chk['prompts']} prompts.")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    """results.json, results.md and the figure results.svg (standard library only: always drawn)."""
    from .figure import render_svg

    add_conclusions(result)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(result))
    (out / "results.svg").write_text(render_svg(result))
    print("written: " + ", ".join(str(out / f) for f in ("results.json", "results.md", "results.svg")))
