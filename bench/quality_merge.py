"""Merge quality runs of separate invocations (same settings, disjoint seeds) into `bench/results/latest.json`.

A quality worker (`bench/quality.py --_seed K ...`) prints one line per finished row and, when the whole seed
is done, a `ROWS` JSON line. A seed stopped early (a time limit) keeps its printed rows: the JSON line is used
when present, else the printed rows (loss to 4 decimals, exact match to 3, i.e. exactly for 1000 prompts).
The merged runs are aggregated with `quality.aggregate` (same noise rule) and stored under KEY with a
provenance sentence; `python -m bench --render` then rewrites docs/benchmarks.md.

    python bench/quality_merge.py KEY WORKER_OUTPUT... --provenance TEXT [--settings JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.quality import NOISE_RULE, aggregate  # noqa: E402

ROW = re.compile(r"^seed (\d+) (\S+)\s+(\S+)\s+loss ([0-9.]+) EM ([0-9.]+) train ([0-9.]+)s eval ([0-9.]+)s$")


def read_worker(path: str) -> list[dict]:
    """Rows of one worker's stdout (the ROWS line if the seed finished, else its printed rows)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    for line in lines:
        if line.startswith("ROWS "):
            return json.loads(line[5:])
    rows = []
    for line in lines:
        m = ROW.match(line)
        if m:
            rows.append({"seed": int(m[1]), "scheme": m[2], "method": m[3], "completion_loss": float(m[4]),
                         "exact_match": float(m[5]), "train_seconds": float(m[6]), "eval_seconds": float(m[7]),
                         "from_printed_line": True})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("key")
    p.add_argument("outputs", nargs="+")
    p.add_argument("--provenance", required=True)
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "latest.json"))
    a = p.parse_args()
    data = json.load(open(a.results, encoding="utf-8"))
    f = data["benchmarks"][a.key]["figures"]
    runs = list(f["runs"])
    have = {(r["seed"], r["scheme"], r["method"]) for r in runs}
    for path in a.outputs:
        for r in read_worker(path):
            if (r["seed"], r["scheme"], r["method"]) in have:
                raise SystemExit(f"{path}: seed {r['seed']} {r['scheme']} {r['method']} is already in {a.key}")
            runs.append(r)
    f["runs"] = runs
    f["rows"], f["diffs"] = aggregate(runs, f["settings"]["schemes"])
    f["settings"]["seeds"] = len({r["seed"] for r in runs})
    f["noise_rule"] = NOISE_RULE
    f["provenance"] = a.provenance
    with open(a.results, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=1)
        out.write("\n")
    for d in f["diffs"]:
        cl, em = d["completion_loss"], d["exact_match"]
        print(f"{d['scheme']} {d['a']} - {d['b']}: loss {cl['mean']:+.4f} (2SE {2 * (cl['se'] or 0):.4f}, "
              f"n={len(cl['per_seed'])}) {cl['verdict']}; EM {100 * em['mean']:+.1f} pts {em['verdict']}")


if __name__ == "__main__":
    main()
