"""Print the figures of the last reliability test run: `python -m tests.reliability.report`."""

from __future__ import annotations

import json

from ._figures import FIGURES, load


def main() -> None:
    data = load()
    if not data:
        print(f"No figures yet: run `python -m pytest tests/reliability` first (they go to {FIGURES}).")
        return
    for name in sorted(data):
        entry = dict(data[name])
        date, command = entry.pop("date", "?"), entry.pop("command", "?")
        print(f"{name:32s} {json.dumps(entry, sort_keys=True)}  ({date}; {command})")


if __name__ == "__main__":
    main()
