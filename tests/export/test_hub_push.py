"""Model cards and Hub pushes (issue 7): card contents, mocked uploads, offline/no-token errors, token hygiene."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from tiny_data import char_tokenizer, prompt_completion_dataset
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

import hf_roste
from hf_roste import RoSTEConfig
from hf_roste.cli import main as cli_main
from hf_roste.export.hub import HubPushError, push_roste_model
from hf_roste.export.model_card import PLOT_FILE, render_model_card, rotation_summary

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak1234567890abcdef"


@pytest.fixture(scope="module")
def searched(tiny_checkpoints):
    """A tiny QAT Llama after the adaptive search (rotation_config holds per-layer errors)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig(),
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    ids = sample_ids(4, 16)
    hf_roste.search_rotation_config(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    return model


class _Recorder:
    """Stands in for the Hub: records create_repo calls and a copy of every uploaded folder."""

    def __init__(self, root: Path):
        self.root, self.repos, self.uploads = root, [], []

    def install(self, monkeypatch):
        rec = self

        def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, repo_type=None, **kw):
            rec.repos.append({"repo_id": repo_id, "private": private, "token": self.token})
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kw):
            dest = rec.root / f"upload{len(rec.uploads)}"
            shutil.copytree(folder_path, dest)
            rec.uploads.append({"repo_id": repo_id, "dir": dest, "message": commit_message, "token": self.token})
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
                                              commit_message=commit_message, commit_description="", oid="abc")

        def whoami(self, token=None, **kw):
            return {"name": "me"}

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        return self


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_card_metadata_and_sections(searched):
    cfg = searched.config.quantization_config
    text = render_model_card(cfg, repo_id="me/tiny-roste", base_model="org/tiny", datasets=["org/data"],
                             training_args={"learning_rate": 2e-5, "num_train_epochs": 3, "seed": 1, "max_steps": -1},
                             eval_results={"rouge1": 0.4123, "ppl": 7.5})
    card = ModelCard(text)
    data = card.data.to_dict()
    # trained (QA-SFT) weights: the Hub's relation is "finetune", not a plain quantization of the base
    assert data["base_model"] == "org/tiny" and data["base_model_relation"] == "finetune"
    assert data["library_name"] == "hf-roste" and data["pipeline_tag"] == "text-generation"
    assert {"roste", "w4a4kv4", "quantized", "trl", "sft", "arxiv:2502.09003", "roste-packed",
            "transformers"} <= set(data["tags"])
    assert data["datasets"] == ["org/data"]
    results = {r.metric_type: r for r in card.data.eval_results}  # model-index, parsed back by huggingface_hub
    assert results["rouge1"].metric_value == 0.4123 and results["ppl"].metric_value == 7.5
    assert results["rouge1"].dataset_type == "org/data" and results["rouge1"].task_type == "text-generation"
    body = card.text
    assert "| linear weights | 4 | no | per output channel | 0.95 |" in body
    assert "| K/V cache | 4 | no | per token per head (dynamic) | 0.95 |" in body
    assert f"![Per-layer quantization error with and without rotation]({PLOT_FILE})" in body
    assert "| learning_rate | 2e-05 |" in body and "max_steps" not in body
    assert "| rouge1 | 0.4123 |" in body
    assert "import hf_roste" in body and 'from_pretrained("me/tiny-roste"' in body
    assert "- R1 (residual stream, fused into every weight): on" in body
    assert "R4 off / on" in body  # per-layer error table from rotation_config["errors"]


def test_rotation_summary_compact():
    cfg = RoSTEConfig(rotation_config={"R1": True, "layers": [
        {"R2": True, "R3": False, "R4": i in (0, 1, 2, 5)} for i in range(8)]})
    text = rotation_summary(cfg)
    assert "R2 (V/O per head, fused): on in all 8 layers" in text
    assert "R3 (Q/K online, before K/V quantization): off in every layer" in text
    assert "R4 (down_proj input, online): on in 4/8 layers: 0-2, 5" in text


def test_model_push_to_hub_uploads_packed_model_and_card(searched, tmp_path, monkeypatch, caplog):
    rec = _Recorder(tmp_path)
    rec.install(monkeypatch)
    with caplog.at_level(logging.DEBUG):
        info = searched.push_to_hub("me/tiny-roste", token=FAKE_TOKEN, private=True, base_model="org/tiny",
                                    datasets=["org/data"], tokenizer=char_tokenizer())
    assert info.commit_url.endswith("/commit/abc")
    assert rec.repos == [{"repo_id": "me/tiny-roste", "private": True, "token": FAKE_TOKEN}]
    assert len(rec.uploads) == 1  # one commit
    up = rec.uploads[0]["dir"]
    files = _files(up)
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", PLOT_FILE,
            "tokenizer.json", "tokenizer_config.json"} <= files
    card = ModelCard.load(up / "README.md")
    assert card.data.base_model == "org/tiny" and "w4a4kv4" in card.data.tags
    assert f"]({PLOT_FILE})" in card.text and (up / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    # the upload is the packed checkpoint and loads back as a packed RoSTE model
    reloaded = AutoModelForCausalLM.from_pretrained(up, attn_implementation="eager")
    assert hf_roste.get_state(reloaded).packed
    # token hygiene: never in a written file nor in the logs
    for path in up.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in caplog.text


def test_push_folder_and_cli(searched, tmp_path, monkeypatch, capsys):
    rec = _Recorder(tmp_path / "hub")
    rec.install(monkeypatch)
    saved = tmp_path / "saved"
    searched.save_pretrained(saved)
    (saved / "README.md").write_text("stale card")
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    code = cli_main(["push", str(saved), "me/cli-model", "--private", "--base-model", "org/tiny"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert FAKE_TOKEN not in out.out + out.err
    up = rec.uploads[0]["dir"]
    assert rec.uploads[0]["token"] == FAKE_TOKEN and rec.repos[0]["private"] is True
    assert {"config.json", "model.safetensors", "README.md", PLOT_FILE} <= _files(up)
    assert ModelCard.load(up / "README.md").data.base_model == "org/tiny"
    assert "stale card" not in (up / "README.md").read_text()


def test_trainer_push_to_hub(tiny_checkpoints, tmp_path, monkeypatch):
    from hf_roste.training import RoSTESFTConfig, RoSTESFTTrainer

    rec = _Recorder(tmp_path / "hub")
    rec.install(monkeypatch)
    args = RoSTESFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8,
                          learning_rate=5e-3, report_to="none", save_strategy="no", use_cpu=True,
                          rotation_calibration_samples=8, max_length=32, disable_tqdm=True, bf16=False,
                          hub_model_id="me/trained", hub_token=FAKE_TOKEN)
    trainer = RoSTESFTTrainer(model=str(tiny_checkpoints["llama"]), args=args, train_dataset=prompt_completion_dataset(16),
                              processing_class=char_tokenizer(), quantization_config=RoSTEConfig())
    trainer.train()
    trainer.push_to_hub(eval_results={"loss": 1.25}, datasets="org/data")
    up = rec.uploads[-1]["dir"]
    assert rec.uploads[-1]["repo_id"] == "me/trained"
    files = _files(up)
    assert {"config.json", "model.safetensors", "README.md", PLOT_FILE, "tokenizer.json"} <= files
    card = ModelCard.load(up / "README.md")
    assert "| learning_rate | 0.005 |" in card.text and "| rotation_calibration_samples | 8 |" in card.text
    assert "| loss | 1.25 |" in card.text and card.data.datasets == ["org/data"]
    for path in up.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt"):
            assert FAKE_TOKEN not in path.read_text(errors="ignore"), path


def test_offline_mode_is_a_clear_error(searched, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    called = []
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: called.append(1))
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE=1"):
        push_roste_model(searched, "me/x", token=FAKE_TOKEN)
    assert not called


def test_missing_token_is_a_clear_error(searched, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubPushError, match="No Hugging Face token"):
        searched.push_to_hub("me/x")


def test_unreachable_hub_is_a_clear_error_without_the_token(searched, monkeypatch, caplog):
    httpx = pytest.importorskip("httpx2")  # huggingface_hub 2.x transport

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def boom(self, *a, **k):
        raise httpx.ConnectError(f"connection refused (auth Bearer {FAKE_TOKEN})")

    monkeypatch.setattr(HfApi, "create_repo", boom)
    with caplog.at_level(logging.DEBUG), pytest.raises(HubPushError) as info:
        push_roste_model(searched, "me/x", token=FAKE_TOKEN)
    msg = str(info.value)
    assert "Could not reach the Hugging Face Hub" in msg and FAKE_TOKEN not in msg
    assert FAKE_TOKEN not in caplog.text
    assert info.value.__cause__ is None


def test_cli_push_offline_exit_code(tmp_path, searched, capsys):
    saved = tmp_path / "saved"
    searched.save_pretrained(saved)
    assert os.environ.get("HF_HUB_OFFLINE") == "1" or hub_constants.HF_HUB_OFFLINE
    code = cli_main(["push", str(saved), "me/x", "--token", FAKE_TOKEN])
    err = capsys.readouterr().err
    assert code == 2 and "offline mode" in err and FAKE_TOKEN not in err


@pytest.mark.parametrize("rotations", [("R1",), ()])
def test_card_without_per_layer_rotations(tiny_checkpoints, tmp_path, rotations):
    from hf_roste.export.hub import prepare_push_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32,
                                                 quantization_config=RoSTEConfig(rotations=rotations)).eval()
    ids = sample_ids(4, 16)
    hf_roste.search_rotation_config(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    prepare_push_folder(model, tmp_path / "push", repo_id="me/x")
    card = (tmp_path / "push" / "README.md").read_text()
    assert "| layer |" not in card and not (tmp_path / "push" / PLOT_FILE).exists()


# --------------------------------------------------------------------------- push_to_hub arguments (issue 24)
class _FullRecorder(_Recorder):
    """Also records every keyword of upload_folder."""

    def install(self, monkeypatch):
        super().install(monkeypatch)
        rec, inner = self, HfApi.upload_folder

        def upload_folder(self, **kw):
            rec.kwargs = kw
            return inner(self, **kw)

        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_honours_every_transformers_argument(searched, tmp_path, monkeypatch):
    import inspect

    from transformers.utils.hub import PushToHubMixin

    rec = _FullRecorder(tmp_path).install(monkeypatch)
    searched.push_to_hub("me/tiny", commit_message="msg", commit_description="why this upload", private=True,
                         token=FAKE_TOKEN, revision="dev", create_pr=True, max_shard_size="100KB",
                         tags=["my-tag"], base_model="org/tiny")
    kw = rec.kwargs
    assert kw["commit_message"] == "msg" and kw["commit_description"] == "why this upload"
    assert kw["revision"] == "dev" and kw["create_pr"] is True
    assert rec.repos[-1]["private"] is True and rec.uploads[-1]["token"] == FAKE_TOKEN
    files = _files(rec.uploads[-1]["dir"])
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert "my-tag" in ModelCard((rec.uploads[-1]["dir"] / "README.md").read_text()).data.tags
    # every parameter of transformers' push_to_hub was passed above (none is silently dropped)
    names = set(inspect.signature(PushToHubMixin.push_to_hub).parameters) - {"self", "repo_id"}
    known = {"commit_message", "commit_description", "private", "token", "revision", "create_pr", "max_shard_size",
             "tags", "safe_serialization", "use_temp_dir", "variant"}
    assert names <= known, f"transformers' push_to_hub has new arguments to honour or refuse: {names - known}"


def test_push_to_hub_refuses_what_it_cannot_do(searched, tmp_path, monkeypatch):
    _Recorder(tmp_path).install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    with pytest.raises(ValueError, match="safetensors"):
        searched.push_to_hub("me/tiny", safe_serialization=False)
    with pytest.raises(ValueError, match="variant"):
        searched.push_to_hub("me/tiny", variant="fp16")
    with pytest.raises(TypeError, match="no_such_option"):
        searched.push_to_hub("me/tiny", no_such_option=1)
    searched.push_to_hub("me/tiny", safe_serialization=True, use_temp_dir=True)  # what the push does anyway


def test_card_relation_and_install_line_of_an_untrained_model(searched):
    from huggingface_hub import ModelCardData

    cfg = searched.config.quantization_config
    card = ModelCard(render_model_card(cfg, repo_id="me/tiny-roste", base_model="org/tiny"))
    data = card.data
    assert isinstance(data, ModelCardData) and data.base_model_relation == "quantized"
    assert "trl" not in data.tags and "sft" not in data.tags and data.eval_results is None
    assert "pip install hf-roste\n" not in card.text and "pip install ." in card.text  # no unpublished package
    with pytest.raises(ValueError, match="base_model_relation"):
        render_model_card(cfg, repo_id="me/x", base_model="org/tiny", base_model_relation="distilled")


def test_cli_push_puts_hf_roste_eval_results_in_model_index(searched, tmp_path, monkeypatch, capsys):
    import json

    rec = _Recorder(tmp_path / "hub").install(monkeypatch)
    saved = tmp_path / "saved"
    searched.save_pretrained(saved)
    report = tmp_path / "scores.json"  # the shape `hf-roste eval --output` writes
    report.write_text(json.dumps({"task": "rouge", "model": str(saved), "dataset": "trl-lib/tldr", "split": "test",
                                  "model_kind": "RoSTE w4a4kv4", "results": {"rouge1": 0.31, "rougeL": 0.22, "n": 8}}))
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert cli_main(["push", str(saved), "me/m", "--base-model", "org/tiny", "--eval-results", str(report)]) == 0
    card = ModelCard.load(rec.uploads[0]["dir"] / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"rouge/rouge1", "rouge/rougeL", "rouge/n"}
    assert results["rouge/rouge1"].metric_value == 0.31 and results["rouge/rouge1"].dataset_type == "trl-lib/tldr"
    assert card.data.model_name == "m"
