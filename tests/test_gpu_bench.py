"""bench/gpu_train_step.py: skips cleanly without CUDA, and its whole pipeline runs on tiny shapes (--dry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_train_step.py"


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path; with CUDA the benchmark really runs")
def test_without_cuda_prints_skipped_json_and_exits_0():
    proc = _run(timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["skipped"] == "no CUDA device" and last["gpu"] is None


def test_unknown_shape_is_a_clear_error():
    proc = _run("--dry", "--shapes", "0_5b,70b", timeout=300)
    assert proc.returncode == 2 and "unknown shape(s) ['70b']" in proc.stderr


@pytest.mark.slow
def test_dry_run_produces_every_figure():
    proc = _run("--dry", "--shapes", "0_5b", "--reps", "1", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["dry"] is True and last["gpu"] == "cpu (dry run)"
    for key in ("step_time_ratio_0_5b", "ste_step_time_ratio_0_5b", "compiled_step_time_ratio_0_5b"):
        assert isinstance(last[key], float) and last[key] > 0, key
    res = last["results"]["0_5b"]
    assert res["plain_step_ms"] > 0 and "plain_compiled_vs_eager" in res
    assert "roste_compiled_step_time_ratio" in res and "ste_compiled_step_time_ratio" in res
    assert "peak_memory_ratio_0_5b" not in last  # CUDA-only figure: never invented on CPU
