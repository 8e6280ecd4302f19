"""Aggregation over seeds (paired against FP SFT), the printed table, JSON / Markdown / PNG outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

#: Row labels of the comparison table, per method of `run.METHODS`.
METHOD_LABELS = {
    "fp_sft": "FP SFT",
    "sft_rtn": "SFT + RTN",
    "sft_rot_rtn": "SFT + rotation + RTN (QuaRot-style)",
    "ste": "STE QA-SFT",
    "roste": "RoSTE QA-SFT (adaptive)",
}

NOISE_RULE = (
    "For each seed, d = metric(method) - metric(FP SFT) of the same seed (same eval prompts). Over n seeds, "
    "SE = sample standard deviation of d / sqrt(n). A mean difference is 'beyond noise' when |mean d| > 2 SE, "
    "else 'within noise' (seed-to-seed spread). With n = 2 this means both seeds agree in sign and their mean "
    "exceeds the gap between them. With 1 seed no noise estimate exists ('n/a')."
)
COMPARISONS = (("roste", "ste"), ("roste", "sft_rot_rtn"), ("ste", "sft_rtn"), ("sft_rot_rtn", "sft_rtn"))


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "se": None, "verdict": "n/a (1 seed)", "per_seed": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    verdict = "beyond noise" if abs(mean) > 2 * se else "within noise"
    return {"mean": mean, "se": se, "verdict": verdict, "per_seed": values}


def _paired(runs: list[dict], scheme_a: str, a: str, scheme_b: str, b: str, key: str) -> dict:
    by = {(r["seed"], r["scheme"], r["method"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    diffs = [by[(s, scheme_a, a)][key] - by[(s, scheme_b, b)][key] for s in seeds]
    return _stats(diffs)


def aggregate(runs: list[dict], settings) -> tuple[list[dict], str]:
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
            row["vs_fp_sft"] = {k: _paired(runs, scheme, method, "FP", "fp_sft", k)
                                for k in ("completion_loss", "exact_match")}
        rot = [r.get("rotation_config") for r in rs if r.get("rotation_config")]
        if rot:
            row["rotation_config_per_seed"] = rot
        rows.append(row)
    return rows, NOISE_RULE


def comparisons(result: dict) -> list[dict]:
    out = []
    for scheme in result["settings"]["schemes"]:
        for a, b in COMPARISONS:
            entry = {"scheme": scheme, "a": a, "b": b}
            for k in ("completion_loss", "exact_match"):
                entry[k] = _paired(result["runs"], scheme, a, scheme, b, k)
            out.append(entry)
    return out


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
    comps = result.setdefault("comparisons", comparisons(result))
    labels = {r["method"]: r["label"] for r in result["rows"]}
    print("Other paired differences (a - b, same seed):")
    for c in comps:
        cl, em = c["completion_loss"], c["exact_match"]
        print(f"  {c['scheme']}: {labels[c['a']]} - {labels[c['b']]}: loss {_fmt_diff(cl, False)} ({cl['verdict']}), "
              f"exact match {_fmt_diff(em, True)} pts ({em['verdict']})")
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
        f"Base: {result['base']['parameters']:,}-parameter Llama-shaped model pre-trained in full precision on a "
        f"synthetic mix. Task: {result['task']['description']}; {result['task']['train_examples']} training "
        f"examples, {result['task']['eval_prompts']} held-out prompts. Seeds: {s['seeds']}, steps: {s['steps']}, "
        f"batch: {s['batch_size']}, lr: {s['learning_rate']}, calibration samples: {s['calibration_samples']}. "
        f"Wall time: {result['wall_seconds']:.1f}s.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", f"Noise rule: {result['noise_rule']}", "", "Other paired differences (a - b, same seed):", ""]
    labels = {r["method"]: r["label"] for r in result["rows"]}
    for c in result.get("comparisons") or comparisons(result):
        cl, em = c["completion_loss"], c["exact_match"]
        lines.append(f"- {c['scheme']}: {labels[c['a']]} - {labels[c['b']]}: loss {_fmt_diff(cl, False)} "
                     f"({cl['verdict']}), exact match {_fmt_diff(em, True)} pts ({em['verdict']})")
    lines.append("")
    for chk in result["reload_checks"]:
        lines.append(f"Reload check (seed {chk['seed']}, {chk['scheme']}): {chk['checkpoint_bytes']:,} bytes, files "
                     + ", ".join(f"`{f['file']}` ({f['bytes']:,} B)" for f in chk["files"])
                     + f"; greedy generations identical on {chk['identical_generations']}/{chk['prompts']} prompts.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install 'hf-roste[eval]' to get it).")
        return False
    rows = result["rows"]
    names = [f"{r['label']}\n{r['scheme']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title, scale in ((axes[0], "completion_loss", "completion loss (lower is better)", 1.0),
                                  (axes[1], "exact_match", "greedy exact match % (higher is better)", 100.0)):
        xs = range(len(rows))
        ax.bar(xs, [scale * r[key] for r in rows], color=["#888" if r["method"] == "fp_sft" else
                                                          "#c44" if r["method"].startswith("sft_") else "#48c"
                                                          for r in rows])
        for x, r in zip(xs, rows, strict=True):
            vals = r[f"{key}_per_seed"]
            ax.scatter([x] * len(vals), [scale * v for v in vals], color="k", s=10, zorder=3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"hf-roste demo: {result['settings']['seeds']} seed(s), dots = seeds; red = PTQ after SFT, "
                 "blue = QA-SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict, out: Path) -> None:
    result.setdefault("comparisons", comparisons(result))
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(result))
    written = [out / "results.json", out / "results.md"]
    if plot(result, out / "results.png"):
        written.append(out / "results.png")
    print("written: " + ", ".join(str(p) for p in written))
