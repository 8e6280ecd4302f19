"""`hf-roste sft` behaves like `trl sft` where they look the same (issue 24)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from hf_roste.cli import main
from hf_roste.commands.sft import parse_args

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))
RECIPES = [p for p in RECIPES if p.parent.name != "accelerate"]


def test_unknown_flag_is_reported_first_whatever_the_machine():
    """A misspelt flag is named before transformers' bf16/GPU check can fail (bf16 defaults to True in TRL)."""
    code = ("import sys; from hf_roste.cli import main; "
            "sys.exit(main(['sft', '--model_name_or_path', 'x', '--dataset_name', 'y', '--no-such-flag', '1']))")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--no-such-flag" in proc.stderr and "bf16" not in proc.stderr, proc.stderr[-2000:]


def test_unknown_yaml_key_is_reported_first(tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model_name_or_path: x\ndataset_name: y\nlearning_rat: 1.0e-5\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "bf16" not in err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_parse_without_the_gradient_checkpointing_deprecation(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, training_args, _, _ = parse_args(["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"])
    # the recipe's value (the `-paper` variants turn it off, as the authors did), under the current name
    assert training_args.activation_checkpointing is yaml.safe_load(recipe.read_text()).get("activation_checkpointing", True)


def test_default_checkpointing_is_trls_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, args, _, _ = parse_args(["--output_dir", "o", "--use_cpu", "true"])
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
    _, args, _, _ = parse_args(["--output_dir", "o", "--use_cpu", "true", "--activation_checkpointing", "false"])
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the old name still works, and says so
        _, args, _, _ = parse_args(["--output_dir", "o", "--use_cpu", "true", "--gradient_checkpointing", "false"])
    assert args.activation_checkpointing is False


# --------------------------------------------------------------------------- every trl sft argument
def test_every_trl_field_has_a_use():
    """A field TRL adds later fails here until hf-roste honours or refuses it."""
    import dataclasses

    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

    from hf_roste.commands.sft import RoSTEScriptArguments
    from hf_roste.training.trl_args import MIXTURE_USE, MODEL_CONFIG_USE, SCRIPT_ARGUMENTS_USE

    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(MODEL_CONFIG_USE)
    assert {f.name for f in dataclasses.fields(ScriptArguments)} == set(SCRIPT_ARGUMENTS_USE)
    assert {f.name for f in dataclasses.fields(DatasetMixtureConfig)} == set(MIXTURE_USE)
    assert set(MIXTURE_USE) | set(SCRIPT_ARGUMENTS_USE) <= {f.name for f in dataclasses.fields(RoSTEScriptArguments)}


@pytest.mark.parametrize("flags, quantize, needle", [
    (["--load_in_4bit", "true"], True, "load_in_4bit=true does not apply to RoSTE"),
    (["--load_in_8bit", "true"], True, "load_in_8bit=true does not apply to RoSTE"),
    (["--bnb_4bit_quant_type", "fp4"], True, "bnb_4bit_quant_type only apply"),
    (["--use_bnb_nested_quant", "true"], False, "use_bnb_nested_quant only apply"),
    (["--use_peft", "true", "--use_dora", "true", "--lora_dropout", "0"], True, "use_dora=true is not supported"),
])
def test_model_config_fields_that_cannot_apply_are_refused(flags, quantize, needle):
    from hf_roste.training.trl_args import TrlArgumentError, from_pretrained_kwargs

    _, training_args, model_args, _ = parse_args(["--output_dir", "o", "--use_cpu", "true", *flags])
    with pytest.raises(TrlArgumentError, match=needle):
        from_pretrained_kwargs(model_args, training_args, quantize)


def test_model_config_and_model_init_kwargs_reach_from_pretrained():
    from hf_roste.training.trl_args import TrlArgumentError, from_pretrained_kwargs

    _, training_args, model_args, _ = parse_args([
        "--output_dir", "o", "--use_cpu", "true", "--model_revision", "v2", "--dtype", "bfloat16",
        "--attn_implementation", "sdpa", "--trust_remote_code", "true",
        "--model_init_kwargs", '{"low_cpu_mem_usage": true}'])
    kwargs = from_pretrained_kwargs(model_args, training_args, quantize=True)
    assert kwargs == {"dtype": "bfloat16", "attn_implementation": "sdpa", "revision": "v2", "trust_remote_code": True,
                      "low_cpu_mem_usage": True}
    training_args.model_init_kwargs = {"quantization_config": {"load_in_4bit": True}}
    with pytest.raises(TrlArgumentError, match="model_init_kwargs.quantization_config"):
        from_pretrained_kwargs(model_args, training_args, quantize=True)


def _trl_example_yaml(tmp_path) -> Path:
    """The shape of TRL's documented `trl sft --config` files: ScriptArguments/SFTConfig/ModelConfig keys, a
    `datasets:` mixture, an `accelerate_config` name and an accelerate launch option."""
    path = tmp_path / "trl_example.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen2-0.5B\n"
        "datasets:\n"
        "  - path: trl-lib/Capybara\n"
        "    split: train\n"
        "  - path: json\n"
        "    data_files: extra.jsonl\n"
        "    columns: [prompt, completion]\n"
        "    fraction: 0.5\n"
        "test_split_size: 0.1\n"
        "learning_rate: 2.0e-5\nnum_train_epochs: 1\npacking: true\nper_device_train_batch_size: 2\n"
        "gradient_accumulation_steps: 8\neos_token: '<|im_end|>'\neval_strategy: steps\neval_steps: 100\n"
        "use_peft: true\nlora_r: 32\nlora_alpha: 16\nlora_dropout: 0.0\noutput_dir: Qwen2-0.5B-SFT\n"
        "accelerate_config: zero3\nnum_processes: 2\nuse_cpu: true\nbf16: false\n"
    )
    return path


def test_trl_example_config_shape_is_fully_consumed(tmp_path):
    from hf_roste.training.trl_args import from_pretrained_kwargs, resolve_accelerate_config

    script_args, training_args, model_args, roste_args = parse_args(["--config", str(_trl_example_yaml(tmp_path))])
    assert [d.path for d in script_args.datasets] == ["trl-lib/Capybara", "json"]
    assert script_args.datasets[1].columns == ["prompt", "completion"] and script_args.test_split_size == 0.1
    assert script_args.accelerate_launch_args == ["--num_processes", "2"]  # to the launcher, as in trl sft
    assert resolve_accelerate_config(script_args.accelerate_config).endswith("recipes/accelerate/zero3.yaml")
    assert training_args.packing is True and training_args.eos_token == "<|im_end|>"
    assert model_args.use_peft and model_args.lora_r == 32
    from_pretrained_kwargs(model_args, training_args, roste_args.quantize)  # nothing refused


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_field_is_consumed_or_refused(recipe):
    """Each YAML key is a dataclass field with a use (or an accelerate launch option), and nothing is refused."""
    import dataclasses

    import yaml

    from hf_roste.commands.sft import DATACLASSES
    from hf_roste.training.trl_args import MODEL_CONFIG_USE, from_pretrained_kwargs, resolve_accelerate_config

    keys = set(yaml.safe_load(recipe.read_text()))
    fields = {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}
    script_args, training_args, model_args, roste_args = parse_args(
        ["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"])
    assert keys <= fields, keys - fields
    assert script_args.accelerate_launch_args == []
    model_keys = keys & {f.name for f in dataclasses.fields(type(model_args))}
    assert model_keys <= set(MODEL_CONFIG_USE)
    kwargs = from_pretrained_kwargs(model_args, training_args, roste_args.quantize)
    assert kwargs["dtype"] == model_args.dtype and kwargs["attn_implementation"] == model_args.attn_implementation
    if script_args.accelerate_config:
        assert os.path.isfile(resolve_accelerate_config(script_args.accelerate_config))


def test_accelerate_config_hands_over_to_accelerate_launch(tmp_path, monkeypatch):
    import accelerate.commands.launch as launch

    from hf_roste.training import trl_args

    monkeypatch.delenv(trl_args.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    calls = []
    monkeypatch.setattr(launch, "launch_command", lambda args: calls.append(args))
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model_name_or_path: m\ndataset_name: d\naccelerate_config: zero3\nuse_cpu: true\nbf16: false\n")
    assert main(["sft", "--config", str(cfg), "--max_steps", "2", "--num_processes", "2", "--learning_rate",
                 "1e-5"]) == 0
    (args,) = calls
    assert args.config_file.endswith("recipes/accelerate/zero3.yaml") and args.num_processes == 2
    assert args.module and args.training_script == "hf_roste.cli"
    assert args.training_script_args == ["sft", "--config", str(cfg), "--max_steps", "2", "--learning_rate", "1e-5"]
    assert os.environ.pop(trl_args.LAUNCHED_ENV) == "1"  # the launched processes train instead of relaunching


def test_dataset_mixture_trains(tmp_path):
    """A `datasets:` mixture (TRL's DatasetMixtureConfig) feeds the trainer: one RoSTE step on two local files."""
    import json

    from tiny_data import prompt_completion_dataset, save_tiny_with_tokenizer

    model = save_tiny_with_tokenizer("llama", tmp_path / "model")
    for name, seed in (("a.jsonl", 0), ("b.jsonl", 1)):
        with open(tmp_path / name, "w") as f:
            for row in prompt_completion_dataset(8, seed=seed):
                f.write(json.dumps(row) + "\n")
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        f"model_name_or_path: {model}\noutput_dir: {tmp_path / 'out'}\n"
        f"datasets:\n  - path: json\n    data_files: {tmp_path / 'a.jsonl'}\n"
        f"  - path: json\n    data_files: {tmp_path / 'b.jsonl'}\n"
        "test_split_size: 0.25\neval_strategy: steps\neval_steps: 1\n"
        "per_device_train_batch_size: 4\nmax_length: 32\nreport_to: none\nsave_strategy: 'no'\nuse_cpu: true\n"
        "activation_checkpointing: false\ndisable_tqdm: true\nrotation_calibration_samples: 8\nbf16: false\n"
        "max_steps: 1\n")
    assert main(["sft", "--config", str(cfg)]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_accelerate_config_none_runs_in_this_process(tmp_path, monkeypatch, capsys):
    import accelerate.commands.launch as launch

    from hf_roste.training import trl_args

    monkeypatch.delenv(trl_args.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    calls = []
    monkeypatch.setattr(launch, "launch_command", lambda args: calls.append(args))
    recipe = next(p for p in RECIPES if p.parent.name == "qwen2.5-0.5b" and p.stem == "roste")
    code = main(["sft", "--config", str(recipe), "--accelerate_config", "none", "--use_cpu", "true", "--bf16", "false",
                 "--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])
    assert calls == [] and code == 2  # no hand-over: the run itself starts (and stops at the missing model)
    assert "missing" in capsys.readouterr().err
