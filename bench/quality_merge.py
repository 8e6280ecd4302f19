"""Merge quality runs of separate invocations (same settings, disjoint seeds) into `bench/results/latest.json`.

A quality worker (`bench/quality.py --_seed K ...`) prints one line per finished row and, when the whole seed
is done, a `ROWS` JSON line. A seed stopped early (a time limit) keeps its printed rows: the JSON line is used
when present, else the printed rows (loss to 4 decimals, exact match to 3, i.e. exactly for 1000 prompts).
A row already stored (e.g. the FP SFT every worker trains first) is checked against the stored value to
the printed precision and then skipped; a mismatch stops the merge. The merged runs are aggregated with `quality.aggregate` (same noise rule) and stored under KEY with a
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

from bench.quality import NOISE_RULE, SCHEMES, aggregate  # noqa: E402

#: a row run again must reproduce the stored one to the printed precision (loss 4 decimals, EM 3)
LOSS_TOL, EM_TOL = 5e-5, 5e-4
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
    have = {(r["seed"], r["scheme"], r["method"]): r for r in runs}
    reproduced = []
    for path in a.outputs:
        for r in read_worker(path):
            key = (r["seed"], r["scheme"], r["method"])
            if key in have:  # a row run again (e.g. the FP SFT every worker trains): it must reproduce the stored one
                old = have[key]
                if not (abs(old["completion_loss"] - r["completion_loss"]) <= LOSS_TOL
                        and abs(old["exact_match"] - r["exact_match"]) <= EM_TOL):
                    raise SystemExit(f"{path}: seed {r['seed']} {r['scheme']} {r['method']} was run again and gave loss "
                                     f"{r['completion_loss']:.4f} EM {r['exact_match']:.3f}, but {a.key} holds "
                                     f"{old['completion_loss']:.4f} / {old['exact_match']:.3f}")
                reproduced.append(key)
                continue
            have[key] = r
            runs.append(r)
    f["runs"] = runs
    schemes = list(dict.fromkeys([*f["settings"]["schemes"], *(r["scheme"] for r in runs if r["scheme"] != "FP")]))
    f["settings"]["schemes"] = [s for s in SCHEMES if s in schemes]
    f["rows"], f["diffs"] = aggregate(runs, f["settings"]["schemes"])
    f["settings"]["seeds"] = len({r["seed"] for r in runs})
    f["noise_rule"] = NOISE_RULE
    f["provenance"] = a.provenance
    with open(a.results, "w", encoding="utf-8") as out:
        json.dump(data, out, indent=1)
        out.write("\n")
    if reproduced:
        print(f"{len(reproduced)} rows run again reproduced the stored values: "
              + ", ".join(f"seed {s} {sc} {m}" for s, sc, m in reproduced))
    for d in f["diffs"]:
        cl, em = d["completion_loss"], d["exact_match"]
        where = f"{d['scheme']} vs {d['scheme_b']}" if d.get("scheme_b") else d["scheme"]
        print(f"{where} {d['a']} - {d['b']}: loss {cl['mean']:+.4f} (2SE {2 * (cl['se'] or 0):.4f}, "
              f"n={len(cl['per_seed'])}) {cl['verdict']}; EM {100 * em['mean']:+.1f} pts {em['verdict']}")


if __name__ == "__main__":
    main()
