"""Run every benchmark, each in its own subprocess, collect their final JSON lines into
`bench/results/latest.json` and render `docs/benchmarks.md` (+ PNG plots) from it.

    python -m bench                      # full suite (sizes chosen to finish in ~20 min on 2 free cores)
    python -m bench --quick              # a ~2-minute sanity run (tiny sizes; figures not meaningful)
    python -m bench --only quality       # one or more benchmarks, merged into the existing latest.json
    python -m bench --render             # only re-render docs/benchmarks.md from latest.json
    python -m bench --only quality_code_base   # optional: quality on bench/bases/code_base (~1 h on 2 idle cores)

Every figure a benchmark reports is a ratio measured inside its own process against a baseline of the
same run (interleaved repetitions, medians, min-max spread). Absolute times are kept for reading, never
compared across runs. Each subprocess's peak resident memory (its own, from `wait4`) and wall time are
recorded too (wait4: CPU time of its process tree, peak RSS of its largest process).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "latest.json")
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")

# name -> (script, extra args in full mode, extra args in quick mode, what it measures)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], str]] = {
    "train_step": ("train_step.py", [], ["--quick"],
                   "training step: RoSTE / STE / torchao QAT vs plain fp32, peak memory"),
    "search": ("search.py", [], ["--quick"], "rotation search time vs one forward pass"),
    "inference": ("inference.py", [], ["--quick"], "packed W4A4KV4 vs fp32 / bf16: bytes, memory, throughput, KV"),
    "scaling": ("scaling.py", [], ["--quick"], "training step and search at three widths"),
    "outliers": ("outliers.py", [], ["--quick"], "per-layer outlier statistics before / after rotation"),
    "quality": ("quality.py", [], ["--quick"], "CPU proxy of the paper's table, paired against FP per seed"),
    # optional (not in the default suite): the quality proxy on the code-corpus base, whose residual stream
    # has (mild) natural outliers: 8 seeds x 3 settings x 320 steps, the RoSTE / STE / PTQ comparisons of
    # issue 22 (no torchao or output-criterion rows); the 2026-12-04 workers took 7.5-21 min each, 2 at a time
    "quality_code_base": ("quality.py", ["--base", "bench/bases/code_base", "--schemes", "W4A4KV4", "W4A8KV4", "W3A3KV3",
                                         "--steps", "320", "--train-examples", "3000", "--seeds", "8",
                                         "--methods", "sft_rtn", "sft_rot_rtn", "ste", "roste"],
                          ["--quick", "--base", "bench/bases/code_base"],
                          "quality proxy at W4A4KV4, W4A8KV4 and W3A3KV3 on the code-corpus base (bench/bases/code_base)"),
    # optional micro-benchmarks (not in the default suite; `--only numerics int_kernels`)
    "numerics": ("numerics.py", [], ["--quick"], "fake quantizer fwd+bwd vs one 4096^2 matmul"),
    "int_kernels": ("int_kernels.py", [], ["--reps", "5"], "W4A4 integer linear vs fp32 / bf16"),
}
DEFAULT = ("train_step", "search", "inference", "scaling", "outliers", "quality")
BASE_ARG = ("quality", "outliers")  # accept --base


def record_rerun(data: dict, run_info: dict) -> None:
    """Append a partial re-run; earlier re-runs keep only the benchmarks whose figures are still theirs."""
    kept = []
    for r in data.get("reruns", []):
        left = [n for n in r.get("requested", []) if n not in run_info["requested"]]
        if left:
            kept.append({**r, "requested": left})
    data["reruns"] = kept + [run_info]


def machine_info() -> dict:
    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        info["cpu_model"] = names[0] if names else platform.processor()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("torch", "transformers", "trl", "peft", "torchao", "matplotlib"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:
            info[mod] = None
    return info


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_one(name: str, quick: bool, base: str | None, timeout: float | None) -> dict:
    script, full_args, quick_args, _ = BENCHMARKS[name]
    cmd = [sys.executable, os.path.join(ROOT, "bench", script), *(quick_args if quick else full_args)]
    if base and name in BASE_ARG:
        cmd += ["--base", base]
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    la0 = load_avg()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
        deadline = None if timeout is None else time.monotonic() + timeout
        status = rusage = None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = st, ru
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - t0
    figures = last_json(stdout) if proc.returncode == 0 else None
    printed = [ln for ln in stdout.splitlines() if not ln.strip().startswith("{")]
    entry = {
        "command": " ".join(["python", os.path.relpath(cmd[1], ROOT), *cmd[2:]]),
        "mode": "quick" if quick else "full",
        "status": "ok" if figures is not None else "failed",
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 1) if rusage else None,
        "peak_rss_mib": round(rusage.ru_maxrss / 1024, 1) if rusage else None,
        "load_avg_before": la0, "load_avg_after": load_avg(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "printed": printed[-80:],
        "figures": figures,
    }
    if figures is None:
        entry["stderr_tail"] = stderr.strip().splitlines()[-25:]
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a ~2-minute sanity run")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these (merged into --out)")
    p.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[])
    p.add_argument("--base", default=None, help="base checkpoint for quality / outliers (default: the demo's)")
    p.add_argument("--out", default=RESULTS, help="results JSON (default bench/results/latest.json)")
    p.add_argument("--docs", default=DOCS, help="rendered Markdown (PNGs next to it); '' to skip rendering")
    p.add_argument("--render", action="store_true", help="only render the docs from --out")
    p.add_argument("--timeout", type=float, default=None, help="per-benchmark timeout in seconds")
    args = p.parse_args(argv)

    from bench.report import render

    if args.render:
        with open(args.out) as f:
            data = json.load(f)
        print("written: " + ", ".join(render(data, args.docs)))
        return 0
    names = [n for n in (args.only or DEFAULT) if n not in args.skip]
    data: dict = {"benchmarks": {}}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
        data.setdefault("benchmarks", {})
    mode = "quick" if args.quick else "full"
    data["machine"] = machine_info()
    run_info = {"mode": mode, "requested": names,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "python -m bench" + (" --quick" if args.quick else "")
                + (f" --only {' '.join(args.only)}" if args.only else "")}
    if args.only and "suite" in data:  # a partial re-run: keep the record of the last whole-suite run
        record_rerun(data, run_info)
    else:
        data["suite"] = run_info
    print(f"hf_roste benchmarks ({mode}): {', '.join(names)}; {data['machine'].get('cpu_model')}, "
          f"{data['machine'].get('cpu_affinity', data['machine']['cpu_count'])} cores, torch {data['machine']['torch']}",
          flush=True)
    t0 = time.perf_counter()
    failed = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {BENCHMARKS[name][3]} ...", flush=True)
        entry = run_one(name, args.quick, args.base, args.timeout)
        data["benchmarks"][name] = entry
        for ln in entry["printed"][-40:]:
            print("    " + ln)
        print(f"    -> {entry['status']} in {entry['wall_seconds']:.0f}s (peak RSS {entry['peak_rss_mib']} MiB)",
              flush=True)
        if entry["status"] != "ok":
            failed.append(name)
            for ln in entry.get("stderr_tail", []):
                print("    ! " + ln)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # written after every benchmark: a crash keeps what was measured
            json.dump(data, f, indent=1, sort_keys=True)
    run_info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    print(f"wall time {run_info['wall_seconds']:.0f}s; results: {args.out}")
    if args.docs:  # render what was written (sorted keys), so `--render` later gives the same page
        with open(args.out) as f:
            print("written: " + ", ".join(render(json.load(f), args.docs)))
    print(json.dumps({"results": args.out, "wall_seconds": run_info["wall_seconds"], "failed": failed,
                      "statuses": {n: data["benchmarks"][n]["status"] for n in names}}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    raise SystemExit(main())
