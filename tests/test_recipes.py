"""Every recipe parses through `hf-roste sft`'s own parser (no network), its model builds and transforms on the
meta device, its batch arithmetic gives the paper's effective batch of 128, and the variants differ only where
they should."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.commands.sft import parse_args, recipe_num_processes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")
MODELS = sorted({p.parent.name for p in RECIPES})
VARIANTS = ("fp", "ste", "roste")
PAPER_LR = {"pythia-1b": 3e-5, "pythia-6.9b": 3e-6, "qwen2.5-0.5b": 5e-5, "qwen2.5-7b": 1e-5, "llama-3.1-8b": 5e-6}


def _parse(path: Path, *extra: str):
    # use_cpu: bf16 recipes are validated against the local device; this machine has no GPU
    return parse_args(["--config", str(path), "--use_cpu", "true", *extra])


@pytest.fixture(scope="module")
def parsed():
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # recipes name their files relative to the repository root
    try:
        return {p: _parse(p) for p in RECIPES}
    finally:
        os.chdir(cwd)


def test_every_model_has_three_variants():
    assert set(MODELS) == set(PAPER_LR)
    for model in MODELS:
        assert {p.stem for p in RECIPES if p.parent.name == model} == set(VARIANTS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_parses_and_matches_the_paper(parsed, path, shared_model_configs):
    script, train, model_args, roste = parsed[path]
    name = path.parent.name
    assert model_args.model_name_or_path in shared_model_configs
    # batch arithmetic for the GPU count of the accelerate config the recipe names
    accel = ROOT / script.accelerate_config
    assert accel.is_file(), script.accelerate_config
    n = recipe_num_processes(str(accel))
    assert train.per_device_train_batch_size * train.gradient_accumulation_steps * n == 128
    assert train.learning_rate == pytest.approx(PAPER_LR[name])
    assert train.bf16 and not train.fp16
    if name == "llama-3.1-8b":
        assert script.dataset_name == "allenai/tulu-3-sft-mixture" and script.max_train_samples == 100_000
        assert train.num_train_epochs == 2 and train.lr_scheduler_type == "linear"
        assert train.warmup_steps == pytest.approx(0.03) and train.max_length == 1024
        assert train.assistant_only_loss and (ROOT / train.chat_template_path).is_file()
    else:
        assert script.dataset_name == "trl-lib/tldr" and script.max_train_samples is None
        assert train.num_train_epochs == 1 and train.lr_scheduler_type == "cosine" and train.warmup_steps == 0
        assert train.max_length == 2048 and train.completion_only_loss
    if path.stem == "fp":
        assert not roste.quantize
    else:
        qc = roste.to_roste_config(train.rotation_search)
        assert (qc.weight_bits, qc.activation_bits, qc.kv_bits) == (4, 4, 4)
        assert qc.weight_clip_ratio == qc.activation_clip_ratio == qc.kv_clip_ratio == 0.95
        if path.stem == "ste":
            assert qc.rotations == () and train.rotation_search == "none" and qc.rotation_search == "none"
        else:
            assert qc.rotations == ("R1", "R2", "R3", "R4") and train.rotation_search == "adaptive"
            assert train.rotation_calibration_samples == 128


def _as_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@pytest.mark.parametrize("model", MODELS)
def test_variants_differ_only_where_they_should(parsed, model):
    runs = {p.stem: parsed[p] for p in RECIPES if p.parent.name == model}
    allowed = {
        1: {"output_dir", "run_name", "rotation_search", "rotation_calibration_samples", "logging_dir",
            "rotation_search_criterion"},
        3: {"quantize", "rotations"},
    }
    base = runs["roste"]
    for variant in ("fp", "ste"):
        for i, (a, b) in enumerate(zip(base, runs[variant], strict=True)):
            da, db = _as_dict(a), _as_dict(b)
            diff = {k for k in da if da[k] != db[k]}
            assert diff <= allowed.get(i, set()), (variant, i, diff)


@pytest.mark.parametrize("model", MODELS)
def test_recipe_model_builds_and_transforms_on_meta(parsed, model, shared_model_configs):
    from hf_roste.convert import prepare_model

    path = next(p for p in RECIPES if p.parent.name == model and p.stem == "roste")
    _, train, model_args, roste = parsed[path]
    fields = {k: v for k, v in shared_model_configs[model_args.model_name_or_path].items() if k != "architectures"}
    config = AutoConfig.for_model(**fields)
    config.num_hidden_layers = 2
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    # the recipe's quantization config, with every rotation it allows switched on (the search's "all on" case)
    recipe_cfg = roste.to_roste_config(train.rotation_search)
    cfg = RoSTEConfig(**{**recipe_cfg.to_dict(), "rotation_search": "all", "quant_method": "roste"})
    m.config.quantization_config = cfg
    state = prepare_model(m, cfg, weights_are_rotated=False)
    assert state.applied["R1"] and all(all(f.values()) for f in state.applied["layers"])


def test_accelerate_configs_are_eight_gpu():
    for name in ("ddp", "fsdp2", "zero3"):
        import yaml

        data = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
        assert data["num_processes"] == 8 and data["mixed_precision"] == "bf16"
    z3 = yaml.safe_load((ROOT / "recipes" / "accelerate" / "zero3.yaml").read_text())
    assert z3["distributed_type"] == "DEEPSPEED" and z3["deepspeed_config"]["zero_stage"] == 3
    f2 = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    assert f2["distributed_type"] == "FSDP" and f2["fsdp_config"]["fsdp_version"] == 2


def test_command_line_overrides_the_yaml():
    path = ROOT / "recipes" / "qwen2.5-0.5b" / "roste.yaml"
    _, train, _, roste = _parse(path, "--learning_rate", "1e-4", "--kv_bits", "8", "--rotations", "R1", "R4")
    assert train.learning_rate == 1e-4 and roste.kv_bits == 8 and roste.rotations == ["R1", "R4"]
    _, _, _, roste = _parse(path, "--rotations", "none")
    assert roste.rotations == []
