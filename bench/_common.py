"""Shared helpers of the benchmarks: interleaved timing and the final JSON line."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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


def run_workers(jobs: list[tuple[str, list[str]]], parallel: int, echo: tuple[str, ...], what: str) -> list[dict]:
    """Run `python ARGS` worker processes, at most `parallel` at a time, each with one OpenMP thread.

    `jobs` holds (label, args) pairs. A worker reports its results on stdout lines starting with
    `ROWS ` followed by a JSON list; they are concatenated in job order. Its lines starting with one of
    `echo` are printed. The first failing worker stops everything with its stderr tail and `what`.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    pending, procs, rows = list(jobs), [], []
    while pending or procs:
        while pending and len(procs) < max(1, parallel):
            label, args = pending.pop(0)
            procs.append((label, subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True, env=env)))
        label, proc = procs.pop(0)
        out, err = proc.communicate()
        for line in out.splitlines():
            if line.startswith("ROWS "):
                rows += json.loads(line[5:])
            elif line.startswith(echo):
                print(line)
        if proc.returncode != 0:
            for _, other in procs:  # do not leave the other workers running
                other.kill()
                other.wait()
            print(err[-3000:], file=sys.stderr)
            raise SystemExit(f"{what} worker {label} failed ({proc.returncode})")
    return rows
