"""Formatting helpers shared by the sections of the benchmarks page (`bench/report.py`)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _f(x, fmt: str = ".3f", none: str = "n/a") -> str:
    if x is None:
        return none
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def _spread(med, lo, hi, fmt: str = ".2f") -> str:
    if med is None:
        return "n/a"
    if lo is None or hi is None:
        return _f(med, fmt)
    return f"{_f(med, fmt)} ({_f(lo, fmt)}-{_f(hi, fmt)})"


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "not met", None: "n/a"}[ok]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _ok(data: dict, name: str) -> dict | None:
    e = data.get("benchmarks", {}).get(name)
    return e["figures"] if e and e.get("status") == "ok" and e.get("figures") else None


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
