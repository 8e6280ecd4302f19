"""The fake-quant and rotation modules train under FSDP2 parameter sharding (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SCRIPT = str(Path(__file__).with_name("fsdp2_script.py"))


def _run(path, nproc: int, mode: str, report: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           SCRIPT, str(path), mode, str(report)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.distributed
def test_fsdp2_two_ranks_equal_single_process(tiny_checkpoints, tmp_path):
    single = _run(tiny_checkpoints["llama"], 1, "single", tmp_path / "single.json")
    sharded = _run(tiny_checkpoints["llama"], 2, "fsdp", tmp_path / "fsdp.json")
    assert single[-1] < single[0]
    assert sharded == pytest.approx(single, rel=1e-5)
