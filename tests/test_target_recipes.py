"""Every serving-target recipe `recipes/<model>/roste-<target>.yaml` (issue 20) parses through `hf-roste sft`'s
parser into exactly `RoSTEConfig.for_target(<target>)`, differs from the paper recipe only in its quantization
and output fields, trains two steps on a tiny model of the recipe's family and exports in its target's format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tiny_data import char_tokenizer, messages_dataset, prompt_completion_dataset, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hf_roste import RoSTEConfig
from hf_roste.cli import main as cli_main
from hf_roste.commands.sft import parse_args
from hf_roste.targets import TARGETS, get_target

ROOT = Path(__file__).resolve().parents[1]
SERVING = [t for t in TARGETS if t != "paper"]
# `roste-paper.yaml` is the authors' exact setup (issue 22, tested in test_recipes_paper.py), not a serving variant
TARGET_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/roste-*.yaml") if p.stem.removeprefix("roste-") in SERVING)
# GPT-NeoX (Pythia) has LayerNorms, which RoSTE turns into RMSNorms to fuse R1: neither vLLM's GPT-NeoX nor
# llama.cpp's architecture can load that, so the Pythia recipes have no serving variants.
FAMILIES = {"llama-3.1-8b": "llama", "qwen2.5-0.5b": "qwen2", "qwen2.5-7b": "qwen2"}
TINY = {  # sizes every target divides: group 128, Q4_0 blocks of 32, R4 block 128 (intermediate 256 / 384)
    "llama": lambda: LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
    "qwen2": lambda: Qwen2Config(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
                                 max_position_embeddings=256),
}


def _parse(path: Path, *extra: str):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return parse_args(["--config", str(path), "--use_cpu", "true", *extra])
    finally:
        os.chdir(cwd)


def test_every_paper_model_with_a_serving_family_has_every_target():
    assert {p.parent.name for p in TARGET_RECIPES} == set(FAMILIES)
    for model in FAMILIES:
        assert {p.stem for p in TARGET_RECIPES if p.parent.name == model} == {f"roste-{t}" for t in SERVING}


@pytest.mark.parametrize("path", TARGET_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_target_recipe_parses_to_the_target_config(path):
    target = path.stem.removeprefix("roste-")
    script, train, model_args, roste = _parse(path)
    assert roste.target == target and roste.quantize
    assert roste.to_roste_config(train.rotation_search) == RoSTEConfig.for_target(target)
    paper = yaml.safe_load((path.parent / "roste.yaml").read_text())
    ours = yaml.safe_load(path.read_text())
    quant_keys = {"weight_bits", "activation_bits", "kv_bits", "weight_clip_ratio", "activation_clip_ratio",
                  "kv_clip_ratio", "rotations", "rotation_search", "rotation_search_criterion",
                  "rotation_calibration_samples", "target", "output_dir", "run_name"}
    assert {k: v for k, v in paper.items() if k not in quant_keys} == {k: v for k, v in ours.items()
                                                                       if k not in quant_keys}
    assert ours["output_dir"].endswith(f"-roste-{target}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("target_recipes")
    out = {"train": write_jsonl(root / "train.jsonl", prompt_completion_dataset(16)),
           "messages": write_jsonl(root / "messages.jsonl", messages_dataset(16))}
    for family, make in TINY.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make(), dtype=torch.float32).save_pretrained(root / family)
        char_tokenizer().save_pretrained(root / family)
        out[family] = str(root / family)
    return root, out


# one recipe per (family, target): the Qwen2.5 recipes share their quantization section
TRAINED = [p for p in TARGET_RECIPES if p.parent.name in ("llama-3.1-8b", "qwen2.5-0.5b")]


@pytest.mark.parametrize("path", TRAINED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_target_recipe_trains_two_steps_and_exports(path, tiny, tmp_path):
    root, data = tiny
    target = get_target(path.stem.removeprefix("roste-"))
    family = FAMILIES[path.parent.name]
    dataset = data["messages"] if family == "llama" else data["train"]  # the Llama recipe trains on messages
    out = tmp_path / "trained"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = cli_main(["sft", "--config", str(path), "--model_name_or_path", data[family], "--dataset_name", dataset,
                       "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                       "--gradient_accumulation_steps", "1", "--max_length", "32", "--use_cpu", "true", "--bf16",
                       "false", "--activation_checkpointing", "false", "--save_strategy", "no", "--logging_steps", "1",
                       "--accelerate_config", "none",
                       "--disable_tqdm", "true", "--attn_implementation", "eager", "--dataset_test_split", "none",
                       "--eval_strategy", "no", "--max_train_samples", "16"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["target"] == target.name
    if target.export_format == "gguf":
        assert cli_main(["export", str(out), str(tmp_path / "model.gguf"), "--format", "gguf"]) == 0
        assert (tmp_path / "model.gguf").stat().st_size > 0
    else:
        calib = []  # NVFP4 activations: the export measures each layer's input_global_scale on data
        if RoSTEConfig.for_target(target.name).activation_format == "nvfp4":
            calib = ["--dataset", dataset, "--samples", "8", "--batch-size", "4", "--max-length", "32"]
        assert cli_main(["export", str(out), str(tmp_path / "ct"), "--format", "compressed-tensors", *calib]) == 0
        qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors"
        if calib:
            assert qc["format"] == "nvfp4-pack-quantized" and qc["transform_config"]["config_groups"]["R4"]
