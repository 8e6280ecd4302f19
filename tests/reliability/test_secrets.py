"""Secrets: a Hub token never reaches config files, model cards, training-args pickles, logs or error messages."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig

from ._figures import record

TOKEN = "hf_RoSTEsecretTOKEN0123456789abcdef"


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    uploads: list[dict[str, bytes]] = []
    fail_with: BaseException | None = None

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with
        files = {}
        for root, _, names in os.walk(folder_path):
            for n in names:
                p = os.path.join(root, n)
                files[os.path.relpath(p, folder_path)] = Path(p).read_bytes()
        FakeApi.uploads.append(files)
        return types.SimpleNamespace(oid="0" * 40, commit_url="https://huggingface.co/x/commit/0")


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    FakeApi.uploads, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return FakeApi


def _scan_tree(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def qat(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32,
                                                quantization_config=RoSTEConfig(rotation_search="all")).eval()


_scanned = {"files": 0, "log_chars": 0}


def _assert_clean_logs(caplog, capfd):
    out, err = capfd.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records) + out + err
    _scanned["log_chars"] += len(logs)
    assert TOKEN not in logs


def test_push_roste_model_uploads_and_logs_no_token(qat, hub, caplog, capfd, tmp_path):
    from hf_roste.export.hub import push_roste_model

    sys.path.insert(0, str(Path(__file__).parent.parent / "training"))
    from hf_roste.training import RoSTESFTConfig

    args = RoSTESFTConfig(output_dir=str(tmp_path), hub_token=TOKEN, report_to="none", use_cpu=True, bf16=False)
    with caplog.at_level(logging.DEBUG):
        push_roste_model(qat, "me/tiny-roste", token=TOKEN, training_args=args, base_model="tiny/llama")
    files = hub.uploads[-1]
    assert "README.md" in files and "config.json" in files
    _scanned["files"] += len(files)
    assert not [n for n, b in files.items() if TOKEN.encode() in b]
    _assert_clean_logs(caplog, capfd)


def test_model_push_to_hub_uploads_and_logs_no_token(qat, hub, caplog, capfd):
    with caplog.at_level(logging.DEBUG):
        qat.push_to_hub("me/tiny-roste", token=TOKEN)
    files = hub.uploads[-1]
    _scanned["files"] += len(files)
    assert not [n for n, b in files.items() if TOKEN.encode() in b]
    _assert_clean_logs(caplog, capfd)


@pytest.mark.parametrize("kind", ["connection", "http"])
def test_push_errors_never_quote_the_token(qat, hub, kind):
    from huggingface_hub.errors import HfHubHTTPError

    from hf_roste.export.hub import HubPushError, push_roste_model

    if kind == "connection":
        hub.fail_with = ConnectionError(f"connection reset while sending Authorization: Bearer {TOKEN}")
    else:
        import httpx2 as httpx

        response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api"))
        hub.fail_with = HfHubHTTPError(f"401 Unauthorized for token {TOKEN}", response=response)
    with pytest.raises(HubPushError) as err:
        push_roste_model(qat, "me/tiny-roste", token=TOKEN)
    assert TOKEN not in str(err.value) and "***" in str(err.value)
    assert err.value.__cause__ is None or TOKEN not in str(err.value.__cause__)


def test_trainer_with_hub_token_writes_it_nowhere(tiny_checkpoints, hub, tmp_path, caplog, capfd):
    """transformers pickles TrainingArguments (hub_token included) into training_args.bin of every
    checkpoint and of the output folder; RoSTESFTTrainer re-writes it without the token (found here)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "training"))
    from train_script import build_trainer

    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        trainer = build_trainer(str(tiny_checkpoints["llama"]), str(out), max_steps=2, save_steps=2, per_device=8)
        trainer.args.hub_token = TOKEN
        trainer.train()
        trainer.save_model()
        trainer.push_to_hub(token=None)  # falls back to args.hub_token
    assert hub.uploads and not [n for n, b in hub.uploads[-1].items() if TOKEN.encode() in b]
    assert (out / "checkpoint-2" / "training_args.bin").exists() and (out / "training_args.bin").exists()
    leaked = _scan_tree(out)
    _scanned["files"] += sum(1 for p in out.rglob("*") if p.is_file())
    assert not leaked, leaked
    saved = torch.load(out / "training_args.bin", weights_only=False)  # our own file, in a test
    assert saved.hub_token is None and saved.learning_rate == trainer.args.learning_rate
    assert trainer.args.hub_token == TOKEN  # the live arguments are untouched
    _assert_clean_logs(caplog, capfd)
    record("secrets", files_scanned=_scanned["files"], log_chars_scanned=_scanned["log_chars"], token_found=0)
