"""Paired differences over seeds, the noise rule, and the demo's conclusions derived from them.

Every sentence the demo prints as a conclusion is produced here from the run's own per-seed numbers,
so it cannot disagree with the table printed above it. The rule is the benchmark suite's
(`bench/quality.py`), so the demo and the benchmarks decide the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

NOISE_RULE = (
    "Per seed, d = metric(a) - metric(b) on the same held-out prompts (b = FP SFT of the same seed, or another "
    "method of the same seed). Over n seeds, SE = sample standard deviation of d / sqrt(n). A mean difference "
    "is 'beyond noise' when |mean d| > 2 SE and all seeds agree in sign, else 'within noise'. With 1 seed "
    "there is no noise estimate ('n/a')."
)
BEYOND, WITHIN, NA = "beyond noise", "within noise", "n/a (1 seed)"

# (name, a, b): the questions the demo answers for every bit setting, in print order
QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("PTQ vs FP", "sft_rtn", "fp_sft"),
    ("RoSTE vs STE", "roste", "ste"),
    ("RoSTE vs RTN", "roste", "sft_rtn"),
    ("RoSTE vs rotation + RTN", "roste", "sft_rot_rtn"),
)
METRICS = ("completion_loss", "exact_match")
LOWER_IS_BETTER = {"completion_loss": True, "exact_match": False}
METRIC_NAMES = {"completion_loss": "completion loss", "exact_match": "exact match"}


def paired_stats(diffs: Sequence[float]) -> dict:
    """Mean, SE, min, max and verdict of per-seed paired differences under `NOISE_RULE`."""
    if not diffs:
        raise ValueError("paired_stats needs at least one per-seed difference")
    values = [float(d) for d in diffs]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "se": None, "min": mean, "max": mean, "verdict": NA, "per_seed": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    same_sign = all(v > 0 for v in values) or all(v < 0 for v in values)
    verdict = BEYOND if abs(mean) > 2 * se and same_sign else WITHIN
    return {"mean": mean, "se": se, "min": min(values), "max": max(values), "verdict": verdict, "per_seed": values}


def paired(runs: Sequence[dict], scheme_a: str, a: str, scheme_b: str, b: str, key: str) -> dict:
    """`paired_stats` of `key` for method `a` at `scheme_a` minus method `b` at `scheme_b`, seed by seed."""
    by = {(r["seed"], r["scheme"], r["method"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    missing = [s for s in seeds if (s, scheme_a, a) not in by or (s, scheme_b, b) not in by]
    if missing:
        raise ValueError(f"no paired run of {a} ({scheme_a}) and {b} ({scheme_b}) for seeds {missing}")
    return paired_stats([by[(s, scheme_a, a)][key] - by[(s, scheme_b, b)][key] for s in seeds])


def direction(stats: dict, metric: str) -> str:
    """'better' / 'worse' for method a against b on `metric` when the difference is beyond noise, else ''."""
    if stats["verdict"] != BEYOND:
        return ""
    a_lower = stats["mean"] < 0
    return "better" if a_lower == LOWER_IS_BETTER[metric] else "worse"


def sentence(label_a: str, label_b: str, stats: dict[str, dict], seeds: int) -> str:
    """The conclusion for one question, from the two metrics' paired statistics only."""
    if any(stats[m]["verdict"] == NA for m in METRICS):
        return f"not decided: {seeds} seed gives no noise estimate"
    dirs = {m: direction(stats[m], m) for m in METRICS}
    decided = [m for m in METRICS if dirs[m]]
    if not decided:
        return f"no difference between {label_a} and {label_b} beyond seed noise ({seeds} seeds)"
    if len({dirs[m] for m in decided}) > 1:
        parts = ", ".join(f"{dirs[m]} on {METRIC_NAMES[m]}" for m in decided)
        return f"mixed: {label_a} is {parts} than {label_b} (each beyond seed noise)"
    word = dirs[decided[0]]
    if len(decided) == len(METRICS):
        return f"{label_a} is {word} than {label_b} beyond seed noise on both metrics"
    other = next(m for m in METRICS if m not in decided)
    return (f"{label_a} is {word} than {label_b} beyond seed noise on {METRIC_NAMES[decided[0]]}; "
            f"{METRIC_NAMES[other]} within noise")


def conclusions(runs: Sequence[dict], schemes: Sequence[str], labels: dict[str, str]) -> list[dict]:
    """One entry per (scheme, question): the paired statistics of both metrics and the derived sentence."""
    seeds = len({r["seed"] for r in runs})
    out = []
    for scheme in schemes:
        for name, a, b in QUESTIONS:
            scheme_b = "FP" if b == "fp_sft" else scheme
            stats = {m: paired(runs, scheme, a, scheme_b, b, m) for m in METRICS}
            out.append({"scheme": scheme, "question": name, "a": a, "b": b, **stats,
                        "conclusion": sentence(labels[a], labels[b], stats, seeds)})
    return out


def format_diff(stats: dict, metric: str) -> str:
    """`+0.0123 ±0.0045` (loss) or `-1.2 ±0.8 pts` (exact match, in points); ± is 2 SE."""
    if metric == "exact_match":
        s = f"{100 * stats['mean']:+.1f}"
        return s + (f" ±{200 * stats['se']:.1f}" if stats["se"] is not None else "") + " pts"
    s = f"{stats['mean']:+.4f}"
    return s + (f" ±{2 * stats['se']:.4f}" if stats["se"] is not None else "")


def conclusion_line(c: dict) -> str:
    """The printed line of one conclusion: the numbers it rests on, then the sentence derived from them."""
    cl, em = c["completion_loss"], c["exact_match"]
    return (f"{c['scheme']} {c['question']}: loss {format_diff(cl, 'completion_loss')} ({cl['verdict']}), "
            f"exact match {format_diff(em, 'exact_match')} ({em['verdict']}) -> {c['conclusion']}")
