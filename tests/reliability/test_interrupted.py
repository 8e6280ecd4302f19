"""Interrupted work: a save killed mid-write leaves the previous save loadable (atomic save_pretrained);
kill -9 during training always resumes from the last complete checkpoint with identical later losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste import io as roste_io

from ._figures import record

DRIVER = str(Path(__file__).with_name("crash_driver.py"))
SAVE_TRIALS, TRAIN_TRIALS, BUDGET_S = 6, 5, 100
# random kill times; the seed is recorded with the figures (set ROSTE_RELIABILITY_SEED to replay a run)
SEED = int(os.environ.get("ROSTE_RELIABILITY_SEED", time.time_ns() % 100_000))


@pytest.fixture(scope="module")
def crash_report(tiny_checkpoints, tmp_path_factory):
    work = tmp_path_factory.mktemp("crash")
    report = work / "report.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, DRIVER, "--model", str(tiny_checkpoints["llama"]), "--work", str(work / "w"),
                          "--report", str(report), "--save-trials", str(SAVE_TRIALS), "--train-trials",
                          str(TRAIN_TRIALS), "--budget", str(BUDGET_S), "--seed", str(SEED)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"seed {SEED}: " + res.stderr[-3000:]
    return json.loads(report.read_text())


def test_save_killed_mid_write_leaves_old_or_new_model(crash_report):
    r = crash_report["atomic_save"]
    record("atomic_save_kill", seed=SEED, trials=r["trials"], loaded_old=r["loaded_v1"], loaded_new=r["loaded_v2"],
           killed_while_running=r["killed_while_running"], failures=len(r["failed"]),
           control_plain_transformers_save=r["control_plain_save"][:120])
    assert r["trials"] >= 3 and not r["failed"], (SEED, r)
    assert r["loaded_v1"] + r["loaded_v2"] == r["trials"]
    assert r["loaded_v1"] >= 1, "no kill landed inside a save: the test did not exercise anything"
    assert r["leftover_tmp_dirs_after_next_save"] == 0
    # the control shows what the atomic save prevents: transformers' in-place save leaves a broken file
    assert "CheckpointError" in r["control_plain_save"], r["control_plain_save"]


def test_kill_during_training_resumes_identically(crash_report):
    r = crash_report["kill_resume"]
    record("kill_resume", seed=SEED, trials=r["trials"], passed=r["passed"], failed=len(r["failed"]), resumed_from=r["resumed_from"],
           kill_after_s=r["kill_after_s"], exact_losses=r["exact_losses"], max_rel_loss_diff=r["max_rel_loss_diff"],
           driver_elapsed_s=crash_report["elapsed_s"])
    assert r["trials"] >= 3 and r["passed"] == r["trials"], (SEED, r["failed"])
    assert r["resumed_from"][0] == "checkpoint-2"  # the trial killed inside checkpoint-4's write


# ------------------------------------------------------------------ atomic save semantics (in process)
@pytest.fixture(scope="module")
def qat(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32, attn_implementation="eager",
                                                quantization_config=RoSTEConfig(rotation_search="all")).eval()


def _logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()(sample_ids()).logits


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_save_keeps_other_files_and_drops_stale_shards(qat, tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(roste_io, "_exchange_dirs", lambda a, b: False)
    d = tmp_path / "out"
    (d / "checkpoint-2").mkdir(parents=True)
    (d / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (d / "README.md").write_text("card")
    (d / "tokenizer.json").write_text("{}")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (d / "model.safetensors.index.json").write_text("{}")
    qat.save_pretrained(d)
    names = sorted(os.listdir(d))
    assert {"README.md", "tokenizer.json", "checkpoint-2", "model.safetensors", "config.json"} <= set(names)
    assert "model-00001-of-00002.safetensors" not in names and "model.safetensors.index.json" not in names
    assert (d / "checkpoint-2" / "optimizer.pt").read_bytes() == b"x"
    assert not [n for n in os.listdir(tmp_path) if ".roste-" in n]
    assert torch.isfinite(_logits(d)).all()


def test_atomic_save_falls_back_in_place_when_the_swap_is_refused(qat, tmp_path, monkeypatch):
    d = tmp_path / "mnt"
    d.mkdir()

    def refuse(a, b):
        raise OSError(16, "Device or resource busy")  # e.g. the folder is a mount point

    monkeypatch.setattr(roste_io, "_exchange_dirs", lambda a, b: False)
    monkeypatch.setattr(roste_io.os, "rename", refuse)
    qat.save_pretrained(d)
    assert (d / "model.safetensors").exists() and not [n for n in os.listdir(tmp_path) if ".roste-" in n]


def test_non_main_process_and_push_are_passed_through(qat, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(roste_io.tempfile, "mkdtemp", lambda **kw: calls.append(kw) or pytest.fail("tmp used"))
    qat.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not calls


def test_trainer_final_save_is_atomic(tiny_checkpoints, tmp_path, monkeypatch):
    """RoSTESFTTrainer.save_model goes through the model's (atomic) save_pretrained."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "training"))
    from train_script import build_trainer

    trainer = build_trainer(str(tiny_checkpoints["llama"]), str(tmp_path / "o"), max_steps=1, save_steps=0, per_device=8)
    seen = []
    real = roste_io.save_pretrained_atomic
    monkeypatch.setattr(roste_io, "save_pretrained_atomic", lambda m, d, **kw: seen.append(d) or real(m, d, **kw))
    trainer.save_model()
    assert seen and os.path.abspath(seen[0]) == os.path.abspath(tmp_path / "o")
    assert (tmp_path / "o" / "roste_state.json").exists() and (tmp_path / "o" / "tokenizer.json").exists()


def test_kill_between_fallback_renames_is_recovered_by_next_save(qat, tmp_path):
    d = tmp_path / "m"
    qat.save_pretrained(d)
    (d / "tokenizer.json").write_text("{}")
    os.rename(d, tmp_path / ".m.roste-old-abc")  # state after the first rename of the fallback, then SIGKILL
    qat.save_pretrained(d)
    assert (d / "tokenizer.json").exists() and (d / "model.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if ".roste-" in n]
