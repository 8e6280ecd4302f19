"""Render `docs/benchmarks.md` (tables + PNG plots, matplotlib Agg) from `bench/results/latest.json`.

Nothing in the Markdown is typed by hand: every number comes from the JSON written by
`bench/run_all.py`. Missing or failed benchmarks are listed as such.

    python -m bench.report [latest.json] [docs/benchmarks.md]
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also run as a script

from bench.report_quality import PTQ, QUALITY_KEYS, sec_outliers, sec_quality  # noqa: E402
from bench.report_util import ROOT, _f, _ok, _plt, _spread, _table, _verdict  # noqa: E402


# ---------------------------------------------------------------- targets
def targets(data: dict) -> list[dict]:
    out = []
    ts = _ok(data, "train_step")
    if ts:
        r, tao = ts.get("step_time_ratio"), ts.get("torchao_step_time_ratio")
        out.append({"target": "RoSTE training step <= 1.25x plain fp32", "measured": f"{_f(r, '.2f')}x",
                    "status": _verdict(r <= 1.25 if r is not None else None)})
        out.append({"target": "RoSTE step ratio below torchao QAT's",
                    "measured": f"RoSTE {_f(r, '.2f')}x vs torchao {_f(tao, '.2f')}x",
                    "status": _verdict(r < tao if (r is not None and tao is not None) else None)})
    se = _ok(data, "search")
    if se:
        r = se.get("search_time_ratio")
        out.append({"target": "rotation search <= 3x one forward pass", "measured": f"{_f(r, '.2f')}x",
                    "status": _verdict(r <= 3 if r is not None else None)})
    inf = _ok(data, "inference")
    if inf:
        r = inf.get("prefill_speedup_vs_fp32")
        out.append({"target": "packed prefill >= 1.5x fp32", "measured": f"{_f(r, '.2f')}x",
                    "status": _verdict(r >= 1.5 if r is not None else None)})
        r = inf.get("decode_speedup_vs_fp32")
        out.append({"target": "packed decode >= 1.2x fp32", "measured": f"{_f(r, '.2f')}x",
                    "status": _verdict(r >= 1.2 if r is not None else None)})
        r = inf.get("bytes_per_linear_param")
        out.append({"target": "checkpoint bytes per quantized-linear parameter <= 0.53", "measured": _f(r, ".4f"),
                    "status": _verdict(r <= 0.53 if r is not None else None)})
        r = inf.get("kv_bytes_ratio_vs_bf16")
        out.append({"target": "KV cache bytes per token <= 0.3x bf16", "measured": f"{_f(r, '.3f')}x",
                    "status": _verdict(r <= 0.3 if r is not None else None)})
    for key in QUALITY_KEYS:
        q = _ok(data, key)
        if not q:
            continue
        where = "" if key == "quality" else f"; {os.path.basename(os.path.normpath(q['base']))}"
        diffs = {(d["scheme"], d["a"], d["b"]): d for d in q.get("diffs", [])}
        schemes = q["settings"]["schemes"]
        if key == "quality":  # the demo base: the hardest setting only; the code base: every setting run
            schemes = ["W3A3KV3"] if "W3A3KV3" in schemes else schemes[:1]
        for scheme in schemes:
            d = diffs.get((scheme, "roste", "ste"))
            if d:
                cl = d["completion_loss"]
                out.append({"target": f"RoSTE completion loss <= STE's ({scheme}{where}, paired, beyond noise)",
                            "measured": f"{cl['mean']:+.4f} ({cl['verdict']}, n={len(cl['per_seed'])})",
                            "status": _verdict(cl["mean"] <= 0 and cl["verdict"] == "beyond noise")})
            for b in PTQ:
                d = diffs.get((scheme, "roste", b))
                if d:
                    cl = d["completion_loss"]
                    out.append({"target": f"RoSTE completion loss below {b} ({scheme}{where}, paired, beyond noise)",
                                "measured": f"{cl['mean']:+.4f} ({cl['verdict']}, n={len(cl['per_seed'])})",
                                "status": _verdict(cl["mean"] < 0 and cl["verdict"] == "beyond noise")})
    return out


# ---------------------------------------------------------------- sections
def sec_train_step(data: dict, png_dir: str, plt) -> tuple[list[str], list[str]]:
    f = _ok(data, "train_step")
    if not f:
        return [], []
    lines = ["## 1. Training step", "",
             "One optimizer step (forward, backward, AdamW) of the same randomly initialised Llama model on the same "
             f"batch (`{f.get('shape')}` shape of `bench/train_step.py`: full = hidden 512, 6 layers, intermediate 2048, "
             "batch 4 x 256; quick = hidden 256, 2 layers, batch 2 x 128), fp32, 2 threads, variants interleaved "
             f"({f.get('reps', 'n/a')} repetitions). Ratio = median step time / median plain step time "
             "(spread: min/max to max/min). Peak memory: high-water RSS of a fresh process doing 3 steps of one "
             "variant, relative to plain.", ""]
    rows = [["plain fp32", _f(f.get("plain_step_ms"), ".0f"), "1.00", "1.00"],
            ["RoSTE W4A4KV4 (all rotations on)", "", _spread(f.get("step_time_ratio"), f.get("step_time_ratio_min"),
                                                          f.get("step_time_ratio_max")),
             _f(f.get("peak_memory_ratio"), ".2f")],
            ["STE W4A4KV4 (no rotation)", "", _spread(f.get("ste_step_time_ratio"), f.get("ste_step_time_ratio_min"),
                                                      f.get("ste_step_time_ratio_max")),
             _f(f.get("ste_peak_memory_ratio"), ".2f")]]
    if f.get("torchao_available"):
        rows.append(["torchao QAT (int8 per-token act., int4 group-32 weights)", "",
                     _spread(f.get("torchao_step_time_ratio"), f.get("torchao_step_time_ratio_min"),
                             f.get("torchao_step_time_ratio_max")), _f(f.get("torchao_peak_memory_ratio"), ".2f")])
    else:
        rows.append(["torchao QAT", "", "not importable in this environment", ""])
    lines += _table(["variant", "plain step ms (this run)", "step time / plain (spread)", "peak RSS / plain"], rows)
    pngs = []
    if plt:
        names, med, lo, hi = [], [], [], []
        for label, k in (("RoSTE", "step_time_ratio"), ("STE", "ste_step_time_ratio"),
                         ("torchao QAT", "torchao_step_time_ratio")):
            if f.get(k) is not None:
                names.append(label)
                med.append(f[k])
                lo.append(f[k] - (f.get(k + "_min") or f[k]))
                hi.append((f.get(k + "_max") or f[k]) - f[k])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(names, med, yerr=[lo, hi], capsize=4, color=["#48c", "#999", "#c84"][: len(names)])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.25, color="g", ls="--", lw=0.8, label="target 1.25x")
        ax.set_ylabel("step time / plain fp32")
        ax.set_title("Training step cost (median, min-max)")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(png_dir, "benchmarks_train_step.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        pngs.append(path)
        lines += ["![training step](benchmarks_train_step.png)", ""]
    return lines, pngs


def sec_search(data: dict) -> list[str]:
    f = _ok(data, "search")
    if not f:
        return []
    lines = ["## 2. Rotation search", "",
             f"`search_rotation_config` over a calibration set of {f.get('samples')} samples x <= {f.get('seq')} tokens "
             f"({f.get('tokens')} real tokens) on `{f.get('model')}` (random init, W4A4KV4), relative to one quantized "
             f"forward pass over the same set ({_f(f.get('forward_seconds'), '.2f')} s in this run); "
             f"{f.get('reps')} interleaved repetitions.", ""]
    rows = []
    for key, label in (("forward_fp", "forward, quantization off"), ("adaptive_paper", "search: adaptive, paper criterion"),
                       ("adaptive_output", "search: adaptive, output criterion"),
                       ("layerwise_paper", "search: layerwise")):
        if f.get(f"{key}_ratio") is not None:
            sp = f.get(f"{key}_spread") or [None, None]
            rows.append([label, _spread(f[f"{key}_ratio"], sp[0], sp[1])])
    lines += _table(["case", "time / one quantized forward (spread)"], rows)
    on = f.get("adaptive_paper_layers_on")
    if on:
        lines += ["Rotations kept by the adaptive search (paper criterion) on this random model: "
                  + ", ".join(f"{k} in {v} layers" for k, v in on.items()) + ".", ""]
    return lines


def sec_inference(data: dict) -> list[str]:
    f = _ok(data, "inference")
    if not f:
        return []
    mdl = f.get("model") or {}
    lines = ["## 3. Inference", "",
             f"A randomly initialised Llama (`{f.get('shape')}` shape of `bench/inference.py`: hidden {mdl.get('hidden')}, "
             f"{mdl.get('layers')} layers, {mdl.get('heads')} heads, intermediate {mdl.get('inter')}, vocab "
             f"{mdl.get('vocab')}), saved as fp32, bf16 and as a packed RoSTE W4A4KV4 checkpoint (all rotations on; "
             "non-quantized tensors stored once in fp32 and once in bf16), each loaded with `from_pretrained`. Prefill "
             "(full shape: batch 8 x 256) without cache; decode: batch 1, greedy, cache on; packed (rest fp32) timed "
             "against fp32 and bf16, variants interleaved. Resident memory: RSS growth of a fresh process after loading "
             "and one forward; 'trimmed' after `gc.collect()` and glibc `malloc_trim(0)` (loader and kernel-builder "
             "transients returned to the OS). Packed (rest bf16) is compared with bf16, packed (rest fp32) with fp32. "
             "Timings run in fresh processes: with glibc's default allocator (headline) and with "
             f"`{' '.join(f'{k}={v}' for k, v in (f.get('tuned_malloc') or {}).items())}` (freed large blocks stay in "
             "the heap instead of costing page faults on every fresh multi-MB temporary; set for all variants).", ""]
    rows = [
        ["CPU int8 GEMM route (`HF_ROSTE_INT8_KERNEL`; `auto` times both once per process)",
         f"{f.get('int8_kernel', 'not recorded')} ({f.get('int8_kernel_setting', 'auto')})"],
        ["bytes per quantized-linear parameter (codes + scales + zero points)", _f(f.get("bytes_per_linear_param"), ".4f")],
        ["checkpoint size / fp32", _f(f.get("checkpoint_ratio_vs_fp32"), ".3f")],
        ["checkpoint size / bf16", _f(f.get("checkpoint_ratio_vs_bf16"), ".3f")],
        ["resident memory / fp32 (trimmed)", f"{_f(f.get('resident_ratio_vs_fp32'), '.3f')} "
                                             f"({_f(f.get('resident_trimmed_ratio_vs_fp32'), '.3f')})"],
        ["resident memory / bf16 (trimmed)", f"{_f(f.get('resident_ratio_vs_bf16'), '.3f')} "
                                             f"({_f(f.get('resident_trimmed_ratio_vs_bf16'), '.3f')})"],
        ["prefill throughput / fp32 (spread)", _spread(f.get("prefill_speedup_vs_fp32"), f.get("prefill_speedup_vs_fp32_min"),
                                                       f.get("prefill_speedup_vs_fp32_max"))],
        ["prefill throughput / bf16", _f(f.get("prefill_speedup_vs_bf16"), ".2f")],
        ["decode throughput / fp32 (spread)", _spread(f.get("decode_speedup_vs_fp32"), f.get("decode_speedup_vs_fp32_min"),
                                                      f.get("decode_speedup_vs_fp32_max"))],
        ["decode throughput / bf16", _f(f.get("decode_speedup_vs_bf16"), ".2f")],
        ["prefill throughput / fp32, tuned allocator for all variants (spread)",
         _spread(f.get("tuned_malloc_prefill_speedup_vs_fp32"), f.get("tuned_malloc_prefill_speedup_vs_fp32_min"),
                 f.get("tuned_malloc_prefill_speedup_vs_fp32_max"))],
        ["decode throughput / fp32, tuned allocator for all variants (spread)",
         _spread(f.get("tuned_malloc_decode_speedup_vs_fp32"), f.get("tuned_malloc_decode_speedup_vs_fp32_min"),
                 f.get("tuned_malloc_decode_speedup_vs_fp32_max"))],
        ["KV cache bytes per token: packed (allocated, with growth reserve)",
         f"{_f(f.get('kv_bytes_per_token_packed'), '.0f')} ({_f(f.get('kv_allocated_bytes_per_token_packed'), '.0f')})"],
        ["KV cache bytes per token: bf16 DynamicCache", _f(f.get("kv_bytes_per_token_bf16"), ".0f")],
        ["KV cache bytes / bf16", _f(f.get("kv_bytes_ratio_vs_bf16"), ".3f")],
    ]
    for size, r in (f.get("r4_over_down_proj_gemm") or {}).items():
        rows.append([f"online R4 at prefill / fp32 down_proj GEMM, n = {size}", _f(r, ".3f")])
    return lines + _table(["packed W4A4KV4 figure", "value"], rows)


def sec_scaling(data: dict, png_dir: str, plt) -> tuple[list[str], list[str]]:
    f = _ok(data, "scaling")
    if not f:
        return [], []
    lines = ["## 5. Scaling with model width", "",
             f"Llama, random init, {f['layers']} layers, intermediate 4 x hidden, head_dim 64, batch {f['batch']} x "
             f"{f['seq']}, 2 threads, {f['reps']} interleaved repetitions per width. Step ratio = RoSTE W4A4KV4 (all "
             f"rotations) / plain fp32 at that width; search ratio = adaptive search / one quantized forward over "
             f"{f['calibration_samples']} calibration samples. Growth columns: time relative to the smallest width's "
             "plain step (or search) in the same run.", ""]
    rows = [[str(r["hidden"]), f"{r['parameters']:,}", _spread(r["step_ratio"], r["step_ratio_min"], r["step_ratio_max"]),
             _spread(r["search_ratio"], r["search_ratio_min"], r["search_ratio_max"]),
             _f(r["param_growth"], ".1f"), _f(r["plain_step_growth"], ".2f"), _f(r["roste_step_growth"], ".2f"),
             _f(r["search_growth"], ".2f"), _f(1e3 * r["plain_step_s"], ".0f")] for r in f["widths"]]
    lines += _table(["hidden", "parameters", "RoSTE step / plain (spread)", "search / forward (spread)",
                     "params growth", "plain step growth", "RoSTE step growth", "search growth",
                     "plain step ms (this run)"], rows)
    pngs = []
    if plt:
        w = f["widths"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        xs = [r["hidden"] for r in w]
        axes[0].errorbar(xs, [r["step_ratio"] for r in w],
                         yerr=[[r["step_ratio"] - r["step_ratio_min"] for r in w],
                               [r["step_ratio_max"] - r["step_ratio"] for r in w]], marker="o", capsize=3,
                         label="RoSTE step / plain")
        axes[0].errorbar(xs, [r["search_ratio"] for r in w],
                         yerr=[[r["search_ratio"] - r["search_ratio_min"] for r in w],
                               [r["search_ratio_max"] - r["search_ratio"] for r in w]], marker="s", capsize=3,
                         label="search / forward")
        axes[0].axhline(1.0, color="k", lw=0.8)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("hidden size")
        axes[0].set_title("overhead ratios")
        axes[0].legend(fontsize=8)
        for key, lab in (("plain_step_growth", "plain step"), ("roste_step_growth", "RoSTE step"),
                         ("search_growth", "search"), ("param_growth", "parameters")):
            axes[1].plot(xs, [r[key] for r in w], marker="o", label=lab)
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("hidden size")
        axes[1].set_title("growth relative to the smallest width")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(png_dir, "benchmarks_scaling.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        pngs.append(path)
        lines += ["![scaling](benchmarks_scaling.png)", ""]
    return lines, pngs


def sec_extra(data: dict) -> list[str]:
    lines = []
    f = _ok(data, "numerics")
    if f:
        rows = [[k[: -len("_ratio")], _f(v, ".4f")] for k, v in sorted(f.items()) if k.endswith("_ratio")]
        lines += ["## Extra: fake quantizer micro-benchmark", "",
                  f"fwd+bwd on a 4096 x 4096 fp32 tensor relative to one 4096^2 fp32 matmul ({f.get('reps')} reps).", ""]
        lines += _table(["case", "time / matmul"], rows)
    f = _ok(data, "int_kernels")
    if f:
        rows = []
        for label, res in f.get("results", {}).items():
            for v, st in res.items():
                rows.append([label, v, _f(st.get("speedup_vs_fp32"), ".2f")])
        lines += ["## Extra: W4A4 integer linear kernel", "", f"Layer {f.get('layer')}; speed-up vs fp32 F.linear.", ""]
        lines += _table(["input", "variant", "speed-up vs fp32"], rows)
    return lines


def render(data: dict, docs_path: str) -> list[str]:
    """Write the Markdown (and PNGs next to it); return the written paths."""
    docs_path = os.path.abspath(docs_path)
    png_dir = os.path.dirname(docs_path)
    os.makedirs(png_dir, exist_ok=True)
    plt = _plt()
    m, suite = data.get("machine", {}), data.get("suite", {})
    order = ("train_step", "search", "inference", "scaling", "outliers", "quality", "quality_code_base", "numerics",
             "int_kernels")
    raw = data.get("benchmarks", {})
    benches = {k: raw[k] for k in order if k in raw} | {k: v for k, v in raw.items() if k not in order}
    lines = ["# Benchmarks", "",
             "<!-- generated by bench/report.py from bench/results/latest.json; do not edit by hand -->", "",
             "Every figure below is a ratio measured inside one process against a baseline of the same run "
             "(interleaved repetitions; medians, with the min-max spread of per-repetition ratios in parentheses). "
             "Absolute times are shown for reading only: the machine is shared, so they drift between runs and are "
             "never compared across runs.", "",
             "## Machine and commands", ""]
    lines += _table(["", ""], [
        ["CPU", f"{m.get('cpu_model')} ({', '.join(m.get('cpu_flags') or []) or 'no AVX flags read'})"],
        ["cores", f"{m.get('cpu_count')} visible, {m.get('cpu_affinity', 'n/a')} usable; benchmarks use 2 torch threads "
                  "(quality: one process per seed, 1 thread each)"],
        ["memory", f"{m.get('mem_total_gib', 'n/a')} GiB"],
        ["software", f"Python {m.get('python')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
                     f"TRL {m.get('trl')}, PEFT {m.get('peft')}, torchao {m.get('torchao') or 'not installed'}"],
        ["suite", f"`{suite.get('command')}` ({suite.get('mode')}), started {suite.get('started')}, wall time "
                  f"{_f(suite.get('wall_seconds'), '.0f')} s"],
    ])
    for r in data.get("reruns", []):
        lines += [f"Re-run after the suite: `{r.get('command')}`, started {r.get('started')}, wall time "
                  f"{_f(r.get('wall_seconds'), '.0f')} s (the figures of {', '.join(r.get('requested', []))} below "
                  "come from this re-run).", ""]
    if m.get("torchao"):
        lines += [f"The peer torchao {m['torchao']} imports on this torch CPU build (its CUDA-only extension libraries "
                  "fail to load with a warning; the QAT fake quantizers used here are plain PyTorch).", ""]
    else:
        lines += ["torchao is not installed here: the torchao QAT rows are absent.", ""]
    lines += ["Reproduce: `pip install -e \".[bench]\"` then `python -m bench` (full suite, writes "
              "`bench/results/latest.json` and this page), `python -m bench --quick` (2-minute sanity run), "
              "`python -m bench --only quality` (one benchmark, merged into latest.json), `python -m bench --only "
              "quality_code_base` (the optional code-base quality run, about an hour on 2 idle cores), `python -m bench --render` "
              "(re-render only). Each benchmark also runs alone, e.g. `python bench/train_step.py`; its last output line "
              "is the JSON stored here.", ""]
    rows = []
    for name, e in benches.items():
        la = e.get("load_avg_before")
        rows.append([name, f"`{e.get('command')}`", e.get("status"), _f(e.get("wall_seconds"), ".0f"),
                     _f(e.get("cpu_seconds"), ".0f"), _f(e.get("peak_rss_mib"), ".0f"),
                     _f(la[0], ".1f") if la else "n/a", e.get("mode"), e.get("finished", "n/a")])
    lines += _table(["benchmark", "command", "status", "wall s", "CPU s", "peak RSS MiB (largest process of its tree)", "load avg (1 min) at start",
                     "mode", "finished (UTC)"], rows)
    cpu = sum(e.get("cpu_seconds") or 0 for e in benches.values())
    wall = sum(e.get("wall_seconds") or 0 for e in benches.values())
    loads = [e["load_avg_before"][0] for e in benches.values() if e.get("load_avg_before")]
    lines += [f"Sum over benchmarks: wall {wall:.0f} s, CPU (user + sys of each benchmark's process tree) {cpu:.0f} s"
              + (f"; 1-minute load average at the starts {min(loads):.1f}-{max(loads):.1f} on "
                 f"{m.get('cpu_affinity', m.get('cpu_count'))} cores (other jobs were sharing the machine when the load "
                 "exceeds the core count)" if loads else "") + ".", ""]
    if suite.get("mode") == "quick" or any(e.get("mode") == "quick" for e in benches.values()):
        lines += ["**Quick mode**: tiny sizes for a sanity check; these figures are not meaningful measurements.", ""]
    tg = targets(data)
    if tg:
        lines += ["## Targets", "", "Targets of issue 9, reported against (not asserted).", ""]
        lines += _table(["target", "measured", "status"], [[t["target"], t["measured"], t["status"]] for t in tg])
    pngs: list[str] = []
    sl, p = sec_train_step(data, png_dir, plt)
    lines += sl
    pngs += p
    lines += sec_search(data)
    lines += sec_inference(data)
    for fn in (sec_quality, sec_outliers, partial(sec_quality, key="quality_code_base"), sec_scaling):
        sl, p = fn(data, png_dir, plt)
        lines += sl
        pngs += p
    lines += sec_extra(data)
    failed = [n for n, e in benches.items() if e.get("status") != "ok"]
    if failed:
        lines += ["## Failed benchmarks", ""]
        for n in failed:
            e = benches[n]
            lines += [f"- `{n}` (return code {e.get('returncode')}):", "", "```",
                      *(e.get("stderr_tail") or ["(no stderr)"])[-10:], "```", ""]
    lines += ["## Raw output", "", "What each benchmark printed (last lines), for reading:", ""]
    for name, e in benches.items():
        lines += [f"<details><summary>{name}</summary>", "", "```", *e.get("printed", [])[-40:], "```", "", "</details>",
                  ""]
    with open(docs_path, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    return [docs_path] + pngs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    src = argv[0] if argv else os.path.join(ROOT, "bench", "results", "latest.json")
    dst = argv[1] if len(argv) > 1 else os.path.join(ROOT, "docs", "benchmarks.md")
    with open(src) as f:
        data = json.load(f)
    print("written: " + ", ".join(render(data, dst)))


if __name__ == "__main__":
    main()
