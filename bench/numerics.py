"""Benchmark of the RoSTE fake quantizer (and the Hadamard transform when available).

Usage::

    /work/venv/bin/python bench/numerics.py [--quick] [--reps N]

Measures forward+backward of ``fake_quantize`` on a ``[4096, 4096]`` fp32 tensor that requires
grad, for each granularity and for a naive op-chain implementation
(``x + (q(x) - x).detach()`` with ``q`` written as separate autograd-tracked torch ops).  Every
figure is reported as a ratio to one fp32 ``[4096x4096] @ [4096x4096]`` matmul timed in the same
process; repetitions of all cases are interleaved, medians and min-max spreads are printed.
The last output line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_roste.numerics import QuantSpec, fake_quantize  # noqa: E402

try:  # optional: written by another module owner
    from hf_roste.numerics.hadamard import hadamard_transform
except Exception:  # noqa: BLE001 - any import problem just disables the Hadamard figures
    hadamard_transform = None


def naive_fake_quant(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Reference op chain: per-token asymmetric quantizer, autograd through every op."""
    mn = x.amin(dim=-1, keepdim=True)
    mx = x.amax(dim=-1, keepdim=True)
    s = ((mx - mn) / (2**bits - 1)).clamp(min=1e-8).detach()
    z = torch.round(-mn / s).detach()
    q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
    xq = (q - z) * s
    return x + (xq - x).detach()


def _timeit(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (< 30 s)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    n = 4096
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    x = torch.randn(n, n, generator=gen).requires_grad_(True)
    g = torch.randn(n, n, generator=gen)

    def fq_case(spec: QuantSpec) -> Callable[[], object]:
        def run() -> None:
            x.grad = None
            fake_quantize(x, spec).backward(g)
        return run

    def naive_case() -> None:
        x.grad = None
        naive_fake_quant(x).backward(g)

    cases: dict[str, Callable[[], object]] = {
        "matmul": lambda: a @ b,
        "fake_quant_token": fq_case(QuantSpec(4, granularity="token")),
        "fake_quant_channel": fq_case(QuantSpec(4, granularity="channel")),
        "fake_quant_group128": fq_case(QuantSpec(4, granularity="group", group_size=128)),
        "fake_quant_tensor": fq_case(QuantSpec(4, granularity="tensor")),
        "fake_quant_token_sym": fq_case(QuantSpec(4, symmetric=True, granularity="token")),
        "naive_fake_quant_token": naive_case,
    }
    if hadamard_transform is not None:
        for m in (4096, 14336):
            h = torch.randn(n, m, generator=gen)
            cases[f"hadamard_{m}"] = (lambda h=h: hadamard_transform(h))
    for fn in cases.values():  # warm-up (allocator, kernels, lazy imports)
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            times[name].append(_timeit(fn))

    mm = statistics.median(times["matmul"])
    result: dict[str, float | int | bool | str] = {
        "matmul_4096_ms": round(mm * 1e3, 2),
        "reps": reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "hadamard_available": hadamard_transform is not None,
    }
    print(f"torch {torch.__version__}, {args.threads} threads, {reps} interleaved reps, medians")
    print(f"{'case':28s} {'median ms':>10s} {'min-max ms':>18s} {'ratio to matmul':>16s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / mm
        print(f"{name:28s} {med * 1e3:10.2f} {min(ts) * 1e3:8.2f}-{max(ts) * 1e3:<9.2f} {ratio:16.4f}")
        if name != "matmul":
            result[f"{name}_ratio"] = round(ratio, 4)
            result[f"{name}_spread"] = [round(min(ts) / mm, 4), round(max(ts) / mm, 4)]
    speedup = statistics.median(times["naive_fake_quant_token"]) / statistics.median(times["fake_quant_token"])
    result["naive_over_fused_token"] = round(speedup, 3)
    print(f"fused fake_quant (token) is {speedup:.2f}x faster than the naive op chain (fwd+bwd)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
