"""bench/gpu_inference.py: the no-CUDA answer and a --dry run of the whole script on tiny CPU shapes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_inference.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_without_cuda_prints_skipped_and_exits_0():
    proc = _run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"skipped": "no CUDA device"}


def test_dry_run_emits_every_figure():
    proc = _run("--dry", "--only", "8b_width", "--reps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["dry"] is True and figures["errors"] == [] and figures["gpu"].startswith("none")
    for key in ("prefill_speedup_vs_bf16_8b_width", "decode_speedup_vs_bf16_8b_width",
                "prefill_speedup_vs_bf16_8b_width_eager", "decode_speedup_vs_bf16_8b_width_eager",
                "decode_b2_speedup_vs_bf16_8b_width", "weight_memory_ratio_vs_bf16", "kv_memory_ratio_vs_bf16"):
        assert isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0, key
    # head_dim 64 at this dry shape, per token per head vs 128 bf16 bytes: the compiled runs' static caches
    # hold 32 code bytes + 4 scale + 2 (int16) zero; the eager runs' dynamic caches 32 + 4 + 1 (int8) zero
    assert figures["kv_cache_8b_width"] == {"packed": "RoSTEQuantizedStaticCache", "bf16": "StaticCache"}
    assert figures["kv_memory_ratio_vs_bf16"] == pytest.approx(38 / 128)
    assert figures["kv_memory_ratio_vs_bf16_dynamic"] == pytest.approx(37 / 128)
    assert "[8b_width] compiled prefill" in proc.stdout
    # intermediate 256 at this dry shape: the full-size R4 is a power of two, the fused kernel applies it
    assert figures["r4_route_8b_width"] == "fused rotate + quantize kernel, Hadamard block 256"
    assert figures["r4_block_size"] is None


def test_r4_block_size_must_divide_the_intermediate_size():
    proc = _run("--dry", "--only", "0_5b", "--r4-block-size", "64")  # dry 0_5b: intermediate 160
    assert proc.returncode != 0 and "r4_block_size=64 does not divide" in proc.stderr
