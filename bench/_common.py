"""Shared helpers of the benchmarks: interleaved timing and the final JSON line."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time each callable `reps` times, interleaved (a, b, c, a, b, c, ...); seconds per call.

    Interleaving spreads the noise of a shared machine evenly over the variants, so their ratios
    stay meaningful even when absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


def ratio(stats: dict[str, dict[str, float]], num: str, den: str) -> dict[str, float]:
    """Median ratio plus the min-max spread of per-repetition ratios."""
    return {
        "median": stats[num]["median"] / stats[den]["median"],
        "min": stats[num]["min"] / stats[den]["max"],
        "max": stats[num]["max"] / stats[den]["min"],
    }


def emit(figures: dict) -> None:
    """Print the benchmark's figures as the last output line (one JSON object)."""
    print(json.dumps(figures, sort_keys=True))
