"""`hf-roste sft` behaves like `trl sft` where they look the same (issue 24)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

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
    assert training_args.activation_checkpointing is True


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
