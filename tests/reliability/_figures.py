"""Figures measured by the reliability tests, kept in `tests/reliability/artifacts/figures.json`.

Each test records what it actually ran (inputs tried, outcomes, trials passed) under its own key,
with the date and the command; `python -m tests.reliability.report` prints the table that
`docs/reliability.md` quotes.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

FIGURES = Path(__file__).with_name("artifacts") / "figures.json"


def load() -> dict:
    try:
        return json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        return {}


def record(name: str, **figures) -> None:
    """Merge `figures` under `name` (with the UTC date and the pytest command line)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    data = load()
    data[name] = {
        **figures,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
    }
    tmp = FIGURES.with_name(f".figures-{os.getpid()}.json")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, FIGURES)
    print(f"[reliability figures] {name}: {json.dumps(figures, sort_keys=True)}")
