"""Cards and Hub pushes of exported models (issue 20): a GGUF file and a compressed-tensors folder each get a
generated card (target, engine command line, quantization table, base model) and `hf-roste push` uploads them."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from test_hub_push import FAKE_TOKEN, _files, _Recorder
from tiny_data import char_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_roste import RoSTEConfig
from hf_roste.cli import main as cli_main
from hf_roste.export.compressed_tensors import export_compressed_tensors
from hf_roste.export.export_card import export_config, render_export_card
from hf_roste.export.gguf import export_gguf


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("card_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(root)
    char_tokenizer().save_pretrained(root)
    return root


def _trained(base, target, folder):
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=RoSTEConfig.for_target(target)).eval()
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_gguf_card_and_push(base, tmp_path, monkeypatch, capsys):
    gguf_file = tmp_path / "tiny-q4_0.gguf"
    export_gguf(_trained(base, "llama.cpp-q4_0", tmp_path / "m"), gguf_file)
    config, summary, fmt = export_config(gguf_file)
    assert fmt == "gguf" and config == RoSTEConfig.from_dict(config.to_dict()) and config.target == "llama.cpp-q4_0"
    rec = _Recorder(tmp_path / "hub").install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert cli_main(["push", str(gguf_file), "me/tiny-GGUF", "--base-model", "org/tiny-base"]) == 0
    up = rec.uploads[0]
    assert up["repo_id"] == "me/tiny-GGUF" and _files(up["dir"]) == {"tiny-q4_0.gguf", "README.md"}
    card = ModelCard.load(up["dir"] / "README.md")
    assert card.data.base_model == "org/tiny-base" and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "gguf" and "llama.cpp-q4_0" in card.data.tags
    assert "llama-cli -m tiny-q4_0.gguf" in card.text and "GGUF Q4_0" in card.text and "groups of 32" in card.text
    assert FAKE_TOKEN not in capsys.readouterr().out


def test_compressed_tensors_card_written_on_export_and_pushed(base, tmp_path, monkeypatch):
    out = tmp_path / "ct"
    export_compressed_tensors(_trained(base, "vllm-w4a16-r4", tmp_path / "m"), out)
    card = ModelCard.load(out / "README.md")
    assert "vllm serve ct --tensor-parallel-size 1" in card.text
    assert "block-diagonal Hadamard of 128" in card.text and "int4 symmetric" in card.text
    assert "base_model" not in card.data.to_dict()
    rec = _Recorder(tmp_path / "hub").install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert cli_main(["push", str(out), "me/tiny-w4a16-r4", "--base-model", "org/tiny-base"]) == 0
    pushed = ModelCard.load(rec.uploads[0]["dir"] / "README.md")
    assert "vllm serve me/tiny-w4a16-r4 --tensor-parallel-size 1" in pushed.text
    assert pushed.data.base_model == "org/tiny-base" and "vllm-w4a16-r4" in pushed.data.tags
    assert "model.safetensors" in _files(rec.uploads[0]["dir"])


def test_export_card_refuses_other_paths(tmp_path):
    with pytest.raises(ValueError, match="neither a .gguf file nor a folder written by hf-roste export"):
        render_export_card(tmp_path, repo_id="me/x")
