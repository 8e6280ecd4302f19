"""The fake-quant and rotation modules train under FSDP2 parameter sharding (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).with_name("fsdp2_script.py"))


def _run(path, nproc: int, mode: str, report: Path, port: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           SCRIPT, str(path), mode, str(report)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.distributed
def test_fsdp2_two_ranks_equal_single_process(tiny_checkpoints, tmp_path):
    single = _run(tiny_checkpoints["llama"], 1, "single", tmp_path / "single.json", 29561)
    sharded = _run(tiny_checkpoints["llama"], 2, "fsdp", tmp_path / "fsdp.json", 29562)
    assert single[-1] < single[0]
    assert sharded == pytest.approx(single, rel=1e-5)
