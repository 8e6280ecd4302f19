"""Micro-benchmark of the W4A4 integer linear kernel vs float baselines (CPU, 2 threads).

Layer 2048 x 2048; inputs of 1 token, 64 tokens and an 8 x 256 prefill.  Variants, run
INTERLEAVED (one call of each per round, so machine-load drift hits all alike):

* ``fp32``            F.linear in fp32
* ``bf16``            F.linear in bf16 (weight pre-cast)
* ``w4a4_int``        PackedLinear W4A4 (4-bit asym per-channel weight, 4-bit asym per-token
                      activation): quantize x, centre the codes, one exact int8 GEMM (oneDNN
                      pre-packed weight, else torch._int_mm), fused fp32 rescale + bias
* ``w4a4_int_g128``   same with per-group (128) weights
* ``unpack_deq``      what a naive deploy would do: unpack + dequantize the weight every call, then
                      fake-quant the activation and F.linear in fp32

Prints a table of medians (ms), min-max spread and ratios vs fp32; the LAST line is one JSON object.
Usage: python bench/int_kernels.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    import hf_roste  # noqa: F401
except ImportError:  # running from a source checkout without installing
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_roste.modules.packed_linear import PackedLinear
from hf_roste.numerics import QuantSpec, fake_quantize


def _run(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 5) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n = args.size
    w = torch.randn(n, n) / n**0.5
    b = torch.randn(n)
    wspec = QuantSpec(4, symmetric=False, granularity="channel")
    wspec_g = QuantSpec(4, symmetric=False, granularity="group", group_size=128)
    aspec = QuantSpec(4, symmetric=False, granularity="token")
    layer = PackedLinear.from_float(w, b, wspec, aspec)
    layer_g = PackedLinear.from_float(w, b, wspec_g, aspec)
    w16, b16 = w.bfloat16(), b.bfloat16()

    def unpack_deq(x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize(x, aspec), layer.dequantized_weight(torch.float32), layer.bias)

    shapes = {"b1": (1, n), "b64": (64, n), "prefill_8x256": (8, 256, n)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for label, shape in shapes.items():
            x = torch.randn(shape)
            x16 = x.bfloat16()
            tokens = shape[0] * (shape[1] if len(shape) == 3 else 1)
            reps = args.reps if tokens <= 64 else max(10, args.reps // 4)
            fns = {
                "fp32": lambda x=x: F.linear(x, w, b),
                "bf16": lambda x16=x16: F.linear(x16, w16, b16),
                "w4a4_int": lambda x=x: layer(x),
                "w4a4_int_g128": lambda x=x: layer_g(x),
                "unpack_deq": lambda x=x: unpack_deq(x),
            }
            times = _run(fns, reps)
            base = statistics.median(times["fp32"])
            results[label] = {}
            print(f"\n{label} {tuple(shape)}  ({reps} interleaved reps, threads={torch.get_num_threads()})")
            print(f"{'variant':<15}{'median ms':>11}{'min':>9}{'max':>9}{'x fp32':>9}")
            for name, ts in times.items():
                med = statistics.median(ts)
                results[label][name] = {
                    "median_ms": round(med, 4),
                    "min_ms": round(min(ts), 4),
                    "max_ms": round(max(ts), 4),
                    "speedup_vs_fp32": round(base / med, 3),
                }
                print(f"{name:<15}{med:>11.3f}{min(ts):>9.3f}{max(ts):>9.3f}{base / med:>9.2f}")
    print(json.dumps({"layer": [n, n], "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
