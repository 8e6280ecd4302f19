"""How `hf-roste sft` uses every argument `trl sft` accepts (TRL's `ScriptArguments`, `ModelConfig`,
`DatasetMixtureConfig`, `SFTConfig`), with the same meaning, or why it refuses one.

`SFTConfig` fields are consumed by TRL's `SFTTrainer` itself (`RoSTESFTConfig` subclasses it), except
`model_init_kwargs` and `trust_remote_code`, which `trl sft` applies when it loads the model by name:
hf-roste loads the model itself (it passes a `RoSTEConfig`), so it applies them here.

`MODEL_CONFIG_USE`, `SCRIPT_ARGUMENTS_USE` and `MIXTURE_USE` say where each field goes; a field TRL
adds in a later release is missing from them, and the tests fail until it is handled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "MIXTURE_USE",
    "MODEL_CONFIG_USE",
    "SCRIPT_ARGUMENTS_USE",
    "TrlArgumentError",
    "accelerate_launch_args",
    "check_model_config",
    "from_pretrained_kwargs",
    "load_mixture",
    "resolve_accelerate_config",
    "split_launch_args",
    "without_subsequence",
]

#: ModelConfig field -> where it goes ("refused with RoSTE: ..." means refused when quantize=true).
MODEL_CONFIG_USE = {
    "model_name_or_path": "from_pretrained (model and, by default, tokenizer)",
    "model_revision": "from_pretrained(revision=...) and the tokenizer",
    "dtype": "from_pretrained(dtype=...)",
    "attn_implementation": "from_pretrained(attn_implementation=...)",
    "use_peft": "trl.get_peft_config -> SFTTrainer(peft_config=...) (RoSTE LoRA with quantize=true)",
    "lora_r": "trl.get_peft_config",
    "lora_alpha": "trl.get_peft_config",
    "lora_dropout": "trl.get_peft_config (must be 0 with RoSTE: no exact merge otherwise)",
    "lora_target_modules": "trl.get_peft_config",
    "lora_target_parameters": "trl.get_peft_config",
    "lora_modules_to_save": "trl.get_peft_config",
    "lora_task_type": "trl.get_peft_config",
    "use_rslora": "trl.get_peft_config",
    "use_dora": "trl.get_peft_config (refused with RoSTE: DoRA's magnitude rescaling has no quantized merge)",
    "load_in_8bit": "trl.get_quantization_config (refused with RoSTE: RoSTE quantizes the weights itself)",
    "load_in_4bit": "trl.get_quantization_config (refused with RoSTE: RoSTE quantizes the weights itself)",
    "bnb_4bit_quant_type": "trl.get_quantization_config (only with load_in_4bit; refused otherwise)",
    "use_bnb_nested_quant": "trl.get_quantization_config (only with load_in_4bit; refused otherwise)",
    "bnb_4bit_quant_storage": "trl.get_quantization_config (only with load_in_4bit; refused otherwise)",
}
#: ScriptArguments field -> where it goes.
SCRIPT_ARGUMENTS_USE = {
    "dataset_name": "the training data (ignored with a warning when `datasets` is given, as in trl sft)",
    "dataset_config": "the dataset's configuration name",
    "dataset_train_split": "the training split",
    "dataset_test_split": "the evaluation split (when eval_strategy is not 'no')",
    "dataset_streaming": "load_dataset(streaming=...)",
    "ignore_bias_buffers": "DDP ignores the model's boolean buffers (model._ddp_params_and_buffers_to_ignore)",
}
#: DatasetMixtureConfig field -> where it goes.
MIXTURE_USE = {
    "datasets": "trl.get_dataset (a mixture replaces dataset_name)",
    "streaming": "trl.get_dataset(streaming=...)",
    "test_split_size": "trl.get_dataset: the mixture's test split (the evaluation split)",
}
_BNB_4BIT_DEFAULTS = {"bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False, "bnb_4bit_quant_storage": None}


class TrlArgumentError(ValueError):
    """A `trl sft` argument that cannot apply to this run (the message says why and what to do)."""


def check_model_config(model_args: Any, quantize: bool) -> None:
    """Refuse the `ModelConfig` settings that cannot take effect, with the reason.

    Raises:
        TrlArgumentError: bitsandbytes loading or DoRA with RoSTE; bitsandbytes 4-bit options without
            ``load_in_4bit``; both ``load_in_4bit`` and ``load_in_8bit``.
    """
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise TrlArgumentError("load_in_4bit and load_in_8bit are both set: choose one (or neither).")
    if quantize and (model_args.load_in_4bit or model_args.load_in_8bit):
        flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
        raise TrlArgumentError(
            f"{flag}=true does not apply to RoSTE: RoSTE replaces the linear layers with its own W4A4 quantizer "
            "(trained through the straight-through estimator), which cannot run on bitsandbytes weights. Drop "
            f"{flag} (RoSTE already stores 4-bit weights), or pass quantize=false for a QLoRA baseline."
        )
    if not model_args.load_in_4bit:
        changed = [k for k, v in _BNB_4BIT_DEFAULTS.items() if getattr(model_args, k) != v]
        if changed:
            raise TrlArgumentError(
                f"{', '.join(changed)} only apply to bitsandbytes 4-bit loading (load_in_4bit=true), which is off: "
                "drop them" + (" (RoSTE quantizes the weights itself)." if quantize else " or set load_in_4bit=true.")
            )
    if quantize and model_args.use_peft and model_args.use_dora:
        raise TrlArgumentError(
            "use_dora=true is not supported with RoSTE LoRA: DoRA rescales the weight by a learned magnitude "
            "after the LoRA update, which has no exact merge into the quantized weight. Use plain LoRA (use_dora "
            "false) or quantize=false."
        )


def from_pretrained_kwargs(model_args: Any, training_args: Any, quantize: bool) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments `trl sft` would use (model config, ``trust_remote_code``,
    ``SFTConfig.model_init_kwargs``), plus bitsandbytes loading for ``quantize=false``.

    ``model_init_kwargs`` may not set ``quantization_config`` with RoSTE (hf-roste passes its own).
    """
    check_model_config(model_args, quantize)
    revision = model_args.model_revision if model_args.model_revision not in (None, "main") else None
    kwargs: dict[str, Any] = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                              "revision": revision}
    if getattr(training_args, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    extra = dict(getattr(training_args, "model_init_kwargs", None) or {})
    if quantize and "quantization_config" in extra:
        raise TrlArgumentError(
            "model_init_kwargs.quantization_config cannot be combined with RoSTE (quantize=true builds the model "
            "with a RoSTEConfig from the quantization fields): remove it, or pass quantize=false."
        )
    kwargs.update(extra)
    if not quantize:
        from trl import get_quantization_config

        qc = get_quantization_config(model_args)
        if qc is not None:
            if "quantization_config" in extra:
                raise TrlArgumentError("quantization_config is set both by load_in_4bit/load_in_8bit and in "
                                       "model_init_kwargs: set it in one place.")
            kwargs["quantization_config"] = qc
    return kwargs


def ignore_bias_buffers(model: Any) -> None:
    """``ignore_bias_buffers=true``: DDP skips the model's boolean buffers (as TRL's scripts do)."""
    import torch

    model._ddp_params_and_buffers_to_ignore = [
        name for name, buffer in model.named_buffers() if buffer.dtype == torch.bool
    ]


def load_mixture(script_args: Any, need_test: bool):
    """The (train, eval) datasets of a ``datasets:`` mixture, with ``trl.get_dataset`` (as `trl sft`).

    Raises:
        TrlArgumentError: the evaluation split is needed but the mixture has none (no ``test_split_size``).
    """
    from trl import DatasetMixtureConfig, get_dataset

    if script_args.dataset_name:
        from transformers.utils import logging

        logging.get_logger("hf_roste.sft").warning(
            "Both `datasets` and `dataset_name` are given: the `datasets` mixture is used and dataset_name=%r is "
            "ignored (as in trl sft).", script_args.dataset_name)
    mixture = DatasetMixtureConfig(datasets=list(script_args.datasets), streaming=script_args.streaming,
                                   test_split_size=script_args.test_split_size)
    data = get_dataset(mixture)
    train = data[script_args.dataset_train_split] if script_args.dataset_train_split in data else data["train"]
    if not need_test:
        return train, None
    split = script_args.dataset_test_split if script_args.dataset_test_split in data else "test"
    if split not in data:
        raise TrlArgumentError(
            "eval_strategy needs an evaluation split, but the `datasets` mixture has none: set test_split_size "
            "(e.g. 0.05) or eval_strategy no."
        )
    return train, data[split]


# ------------------------------------------------------------------ accelerate_config
def _repo_recipes() -> Path:
    return Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def resolve_accelerate_config(value: str) -> str:
    """The accelerate config file of ``accelerate_config``: a path, or a shipped name.

    Looks for, in order: the path itself; ``recipes/accelerate/<value>.yaml`` of the hf_roste source
    tree (``ddp``, ``fsdp2``, ``zero3``); TRL's shipped ``trl/accelerate_configs/<value>.yaml``
    (``zero1``, ``zero2``, ``zero3``, ``fsdp1``, ``fsdp2``, ``multi_gpu``, ``single_gpu``), as `trl sft`.

    Raises:
        TrlArgumentError: nothing of that name exists.
    """
    if os.path.isfile(value):
        return value
    candidates = [_repo_recipes() / f"{value}.yaml", _repo_recipes().parents[1] / value]
    try:
        import importlib.resources as resources

        candidates.append(Path(str(resources.files("trl.accelerate_configs").joinpath(f"{value}.yaml"))))
    except (ModuleNotFoundError, TypeError):
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    names = sorted(p.stem for p in _repo_recipes().glob("*.yaml"))
    raise TrlArgumentError(
        f"accelerate_config={value!r} is neither a file nor a shipped config name ({', '.join(names)}, or TRL's "
        "zero1/zero2/zero3/fsdp1/fsdp2/multi_gpu/single_gpu): pass an accelerate config YAML path."
    )


#: set in the environment of the processes `hf-roste sft` starts through accelerate (they train, not relaunch)
LAUNCHED_ENV = "HF_ROSTE_ACCELERATE_LAUNCHED"


def already_launched() -> bool:
    """Whether this process was started by a launcher (accelerate / torchrun / hf-roste's own hand-over)."""
    return any(k in os.environ for k in (LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"))


def accelerate_launch_args(config_file: str | None, argv: list[str], launch_args: list[str] | None = None) -> list[str]:
    """``accelerate launch`` arguments that run ``hf-roste sft argv`` with ``config_file`` (None: accelerate's default)."""
    config = ["--config_file", config_file] if config_file else []
    return [*config, *(launch_args or []), "-m", "hf_roste.cli", "sft", *argv]


def launch_with_accelerate(config_file: str | None, argv: list[str], launch_args: list[str] | None = None,
                           launch_command_fn=None) -> None:
    """Hand the run over to ``accelerate launch`` (as `trl sft` does with ``accelerate_config``)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(accelerate_launch_args(config_file, argv, launch_args))
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the launched processes: they train
    (launch_command_fn or launch_command)(args)


def split_launch_args(strings: list[str]) -> tuple[list[str], list[str]]:
    """(`accelerate launch` options with their values, the rest) of unparsed argument strings."""
    from accelerate.commands.launch import launch_command_parser

    known = {o for a in launch_command_parser()._actions for o in a.option_strings} - {"-h", "--help", "-m"}
    launch, rest, i = [], [], 0
    while i < len(strings):
        item = strings[i]
        name = item.split("=", 1)[0]
        takes_value = "=" not in item and i + 1 < len(strings) and not strings[i + 1].startswith("--")
        group = strings[i : i + 2] if takes_value else [item]
        (launch if name in known or name.replace("_", "-") in known else rest).extend(group)
        i += len(group)
    return launch, rest


def without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered ``subsequence`` (the launch options found among the command-line args)."""
    rest, it = [], iter(subsequence)
    current = next(it, None)
    for item in items:
        if current is not None and item == current:
            current = next(it, None)
        else:
            rest.append(item)
    return rest
