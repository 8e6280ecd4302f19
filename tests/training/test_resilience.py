"""Kill -9 during training, then resume; a 2-process (gloo) run equals the single-process one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_script import build_trainer

from hf_roste import get_state
from hf_roste.training.trainer import last_complete_checkpoint


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SCRIPT = str(Path(__file__).with_name("train_script.py"))


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_kill_during_training_then_resume(tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["llama"])
    reference = build_trainer(path, str(tmp_path / "ref"), max_steps=8, save_steps=2, per_device=8)
    reference.train()
    ref_losses, ref_layers = _losses(reference), get_state(reference.model).applied["layers"]

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(SCRIPT).parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, SCRIPT, "--model", path, "--output", str(out), "--max-steps", "8",
                             "--save-steps", "2", "--sleep", "0.3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint-4" / "roste_state.json").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.4)  # land somewhere after the checkpoint, possibly inside the next one
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    last = last_complete_checkpoint(str(out))
    assert last is not None and int(last.rsplit("-", 1)[1]) >= 4
    resumed = build_trainer(path, str(out), max_steps=8, save_steps=2, per_device=8)
    resumed.train(resume_from_checkpoint=True)
    assert get_state(resumed.model).applied["layers"] == ref_layers
    start = int(last.rsplit("-", 1)[1])
    again = {k: v for k, v in _losses(resumed).items() if k > start}  # earlier entries come from the checkpoint
    assert set(again) == set(range(start + 1, 9))
    for step, loss in again.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-4, abs=1e-5), (step, again, ref_losses)


def test_incomplete_checkpoint_is_skipped(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "roste_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # killed before its completion mark
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    shutil.rmtree(tmp_path / "checkpoint-2")
    assert last_complete_checkpoint(str(tmp_path)) is None


@pytest.mark.distributed
def test_two_process_gloo_run_matches_single_process(tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["llama"])
    single = build_trainer(path, str(tmp_path / "single"), max_steps=4, save_steps=0, per_device=8)
    single.train()
    single_losses, single_layers = _losses(single), get_state(single.model).applied["layers"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(SCRIPT).parent.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    report = tmp_path / "report"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), SCRIPT,
           "--model", path, "--output", str(out), "--max-steps", "4", "--save-steps", "4", "--per-device", "4",
           "--report", str(report)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = json.loads(Path(f"{report}.0").read_text())
    r1 = json.loads(Path(f"{report}.1").read_text())
    assert r0["layers"] == r1["layers"] == single_layers
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    for step, loss in single_losses.items():
        assert r0["losses"][str(step)] == pytest.approx(loss, rel=2e-3), (step, r0["losses"], single_losses)
