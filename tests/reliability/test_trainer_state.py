"""Nothing is unpickled unsafely on resume: transformers' Trainer torch.loads optimizer.pt / scheduler.pt /
rng_state.pth with weights_only=True, and training_args.bin is never loaded (by hf_roste or by resume)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from ._figures import record

sys.path.insert(0, str(Path(__file__).parent.parent / "training"))


class _Payload:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


@pytest.fixture
def checkpoint(tiny_checkpoints, tmp_path):
    from train_script import build_trainer

    out = tmp_path / "run"
    build_trainer(str(tiny_checkpoints["llama"]), str(out), max_steps=2, save_steps=2, per_device=8).train()
    assert (out / "checkpoint-2" / "roste_state.json").exists()
    return out


def test_resume_loads_trainer_state_with_weights_only(checkpoint, tiny_checkpoints, monkeypatch):
    from train_script import build_trainer

    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append((os.path.basename(str(f)), kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    trainer = build_trainer(str(tiny_checkpoints["llama"]), str(checkpoint), max_steps=4, save_steps=2, per_device=8)
    trainer.train(resume_from_checkpoint=True)
    names = {n for n, _ in calls}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names, calls
    assert all(w is True for _, w in calls), calls
    assert "training_args.bin" not in names
    record("resume_torch_load_calls", calls=[f"{n} weights_only={w}" for n, w in calls])


def test_malicious_pickles_in_a_checkpoint_are_never_executed(checkpoint, tiny_checkpoints, tmp_path):
    from train_script import build_trainer

    _Payload.marker = str(tmp_path / "PWNED")
    ckpt = checkpoint / "checkpoint-2"
    for name in ("training_args.bin", "rng_state.pth", "scheduler.pt", "optimizer.pt"):
        with open(ckpt / name, "wb") as f:
            pickle.dump({"state": _Payload()}, f)
    trainer = build_trainer(str(tiny_checkpoints["llama"]), str(checkpoint), max_steps=4, save_steps=2, per_device=8)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        trainer.train(resume_from_checkpoint=True)
    assert not (tmp_path / "PWNED").exists()
