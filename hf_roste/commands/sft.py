"""`hf-roste sft`: RoSTE QA-SFT (or the full-precision SFT baseline) from a TRL-style YAML recipe.

    hf-roste sft --config recipes/qwen2.5-0.5b/roste.yaml [--learning_rate 1e-5 --output_dir out ...]
    accelerate launch --config_file recipes/accelerate/zero3.yaml -m hf_roste.cli sft --config ...

Same parser conventions as `trl sft` (`trl.TrlParser`): YAML keys and `--flags` are the fields of
`RoSTEScriptArguments` (dataset), `RoSTESFTConfig` (TRL `SFTConfig` + the rotation search),
`trl.ModelConfig` (model) and `RoSTEArguments` (the `RoSTEConfig` quantization fields, same names,
plus `quantize`); command-line flags override the YAML. Nothing here is process-specific, so the
command runs unchanged under `accelerate launch` / `torchrun`.

With `use_peft: true` (RoSTE LoRA: the adapters train inside the weight quantizer) `lora_dropout`
defaults to 0, the only value with an exact merge; TRL's 0.05 stays the default with
`quantize: false`. `resume_from_checkpoint: true` resumes from the newest complete checkpoint of
`output_dir`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, make_dataclass

from transformers.utils import logging
from trl import ModelConfig, ScriptArguments, TrlParser

from ..config import CONFIG_FIELDS, RoSTEConfig
from ..training.config import RoSTESFTConfig
from ._common import (
    CommandError,
    check_output_dir,
    check_path_or_hub_id,
    fail,
    load_dataset_arg,
    load_model_arg,
    load_tokenizer,
    run_guarded,
)

logger = logging.get_logger("hf_roste.sft")

DESCRIPTION = (
    "RoSTE quantization-aware SFT (W4A4KV4 by default) from a TRL-style YAML recipe plus command-line overrides "
    "(--config recipes/<model>/<variant>.yaml --any_field value). Fields: dataset (RoSTEScriptArguments), "
    "training (RoSTESFTConfig = TRL SFTConfig + rotation search), model (trl.ModelConfig) and quantization "
    "(RoSTEArguments: the RoSTEConfig fields; quantize=false runs the full-precision SFT baseline)."
)


@dataclass
class RoSTEScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus sub-sampling, a separate tokenizer and the recipe's launch config."""

    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on a random subset of this many examples (seeded by `seed`), e.g. 100000 for the "
                  "paper's Tulu 3 subset. None = the whole split."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer path or Hub id (default: model_name_or_path)."}
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "The accelerate config the recipe was written for (its num_processes fixes the effective "
                  "batch). Only checked: a different world size logs a warning with the effective batch you get."},
    )


class _RoSTEArgumentsMethods:
    """Validation and conversion of `RoSTEArguments` (its fields are generated from `CONFIG_FIELDS`)."""

    def __post_init__(self) -> None:
        rotations = list(self.rotations or [])
        if [r.lower() for r in rotations] in (["none"], ["[]"], [""]):
            rotations = []
        self.rotations = rotations
        if self.rotation_config is not None and not os.path.isfile(self.rotation_config):
            raise ValueError(
                f"rotation_config={self.rotation_config!r} does not exist: pass the path of a JSON file written by "
                "`hf-roste search MODEL --rotation-config FILE`."
            )
        if self.quantize:
            self.to_roste_config()  # validate every field now, with RoSTEConfig's messages

    def to_roste_config(self, trainer_rotation_search: str | None = None) -> RoSTEConfig:
        rotation_config = None
        if self.rotation_config is not None:
            try:
                with open(self.rotation_config, encoding="utf-8") as f:
                    rotation_config = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(
                    f"rotation_config={self.rotation_config!r} is not valid JSON ({exc}): pass a file written by "
                    "`hf-roste search MODEL --rotation-config FILE`."
                ) from None
            if isinstance(rotation_config, dict) and "rotation_config" in rotation_config:
                rotation_config = rotation_config["rotation_config"]  # a full `search` report
        mode = trainer_rotation_search or "adaptive"  # the same vocabulary (config.SEARCH_STRATEGIES)
        values = {f.name: getattr(self, f.name) for f in CONFIG_FIELDS if f.name not in _NOT_COPIED}
        return RoSTEConfig(**values, rotations=tuple(self.rotations), rotation_search=mode,
                           rotation_config=rotation_config)


#: RoSTEConfig fields whose CLI form differs: `rotation_search` is RoSTESFTConfig's (shared) field,
#: `rotation_config` is a JSON file path, `rotations` a list that also accepts "none".
_NOT_COPIED = ("rotation_search", "rotation_config", "rotations")


def _roste_arguments_fields() -> list[tuple]:
    out: list[tuple] = [(
        "quantize", bool, field(
            default=True,
            metadata={"help": "True: RoSTE QA-SFT with RoSTESFTTrainer. False: the full-precision SFT baseline with "
                      "TRL's SFTTrainer (every other quantization field is then ignored)."},
        ),
    )]
    for f in CONFIG_FIELDS:
        if f.name == "rotation_search":
            continue
        if f.name == "rotations":
            out.append(("rotations", list[str], field(
                default_factory=lambda default=f.default: list(default),
                metadata={"help": f.help + " YAML: [] for none; command line: --rotations none."},
            )))
        elif f.name == "rotation_config":
            out.append(("rotation_config", str | None, field(
                default=None,
                metadata={"help": "Path of a rotation configuration JSON (e.g. written by `hf-roste search "
                          "--rotation-config FILE`); fixes the per-layer rotations, so the trainer does not search again."},
            )))
        else:
            extra = {"choices": list(f.choices)} if f.choices else {}
            out.append((f.name, f.type, field(default=f.default, metadata={"help": f.help, **extra})))
    return out


RoSTEArguments = make_dataclass("RoSTEArguments", _roste_arguments_fields(), bases=(_RoSTEArgumentsMethods,))
RoSTEArguments.__module__ = __name__
RoSTEArguments.__doc__ = """The `RoSTEConfig` fields (same names in YAML, CLI and Python) plus `quantize`.

Generated from `hf_roste.config.CONFIG_FIELDS` (defaults and help are declared there only).
`rotation_search` is the shared field of `RoSTESFTConfig` (the same values as
`RoSTEConfig.rotation_search`): the model is built with that value (`adaptive` when unset), and the
trainer searches when it names a search.
"""


DATACLASSES = (RoSTEScriptArguments, RoSTESFTConfig, ModelConfig, RoSTEArguments)


def make_parser() -> TrlParser:
    """The parser of `hf-roste sft` (a fresh one each call: `--config` sets its defaults)."""
    return TrlParser(DATACLASSES, prog="hf-roste sft", description=DESCRIPTION)


def parse_args(argv: Sequence[str]):
    """(script_args, training_args, model_args, roste_args) from `argv` (YAML via --config + overrides)."""
    argv = list(argv)
    recipe: dict = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise CommandError("--config needs a YAML file, e.g. --config recipes/qwen2.5-0.5b/roste.yaml.")
        config = argv[i + 1]
        if not os.path.isfile(config):
            raise CommandError(f"--config {config!r} does not exist; recipes are in recipes/<model>/<variant>.yaml.")
        recipe = _check_yaml(config)
    script_args, training_args, model_args, roste_args = make_parser().parse_args_and_config(argv)
    _default_lora_dropout(model_args, roste_args, _explicit_fields(argv, recipe))
    return script_args, training_args, model_args, roste_args


def _check_yaml(path: str) -> dict:
    """The recipe's YAML mapping; a file that is not one is a `CommandError` pointing at the problem."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise CommandError(f"--config {path} is not valid YAML: {' '.join(str(exc).split())}. Fix the file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"--config {path} cannot be read: {exc}.") from None
    if data is not None and not isinstance(data, dict):
        raise CommandError(f"--config {path} must hold a YAML mapping of fields (key: value), got a {type(data).__name__}.")
    return data or {}


def _explicit_fields(argv: Sequence[str], recipe: dict) -> set[str]:
    """Field names the user set: `--flags` on the command line and keys of the `--config` YAML."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")} | {str(k) for k in recipe}


def _default_lora_dropout(model_args, roste_args, explicit: set[str]) -> None:
    """RoSTE LoRA needs `lora_dropout=0` (`hf_roste.training.lora`): the default when unset, an error when set."""
    if not (model_args.use_peft and roste_args.quantize) or not model_args.lora_dropout:
        return
    if "lora_dropout" in explicit:
        raise CommandError(
            f"--lora_dropout {model_args.lora_dropout} is not supported with RoSTE: the LoRA update is trained inside "
            "the weight quantizer, so that merging reproduces the trained model, and dropout on the LoRA input has no "
            "merged equivalent. Pass --lora_dropout 0 (or --quantize false for the full-precision LoRA baseline)."
        )
    logger.info("RoSTE LoRA: lora_dropout=0 (TRL's default %s has no exact merge into the quantized weight).",
                model_args.lora_dropout)
    model_args.lora_dropout = 0.0


def register(subparsers) -> None:
    # Listed in `hf-roste --help`; cli.main hands `sft` argv to `main` untouched (TrlParser parses it).
    subparsers.add_parser(
        "sft", help="QA-SFT with RoSTE (or the FP baseline) from a TRL-style YAML recipe: --config FILE [--field value].",
        description=DESCRIPTION + " Run `hf-roste sft --help` for every field.", add_help=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script_args, training_args, model_args, roste_args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    except (CommandError, ValueError, TypeError) as exc:
        message = str(exc)
        if "bf16/gpu" in message:
            message += " On a machine without a GPU add --use_cpu true (bf16 autocast on CPU) or --bf16 false."
        return fail("sft", message)
    return run_guarded("sft", _run, script_args, training_args, model_args, roste_args)


def _run(script_args, training_args, model_args, roste_args) -> int:
    run_sft(script_args, training_args, model_args, roste_args)
    return 0


def _check_world_size(script_args, training_args) -> None:
    world = training_args.world_size
    effective = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    logger.info("Effective batch: %d = per_device_train_batch_size %d x gradient_accumulation_steps %d x %d processes.",
                effective, training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps, world)
    if script_args.accelerate_config:
        expected = recipe_num_processes(script_args.accelerate_config)
        if expected is not None and expected != world:
            logger.warning(
                "This recipe was written for %d processes (%s) but %d are running: the effective batch is %d, not "
                "the recipe's %d. Adjust gradient_accumulation_steps to keep it.", expected,
                script_args.accelerate_config, world, effective,
                training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * expected)


def recipe_num_processes(accelerate_config: str) -> int | None:
    """`num_processes` of an accelerate config YAML (None if the file is not there)."""
    import yaml

    if not os.path.isfile(accelerate_config):
        return None
    with open(accelerate_config, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    n = data.get("num_processes")
    return int(n) if n is not None else None


def _resume_checkpoint(training_args, quantize: bool) -> str | None:
    """`resume_from_checkpoint` as a folder: `true` is the newest complete checkpoint of `output_dir`, `false` none."""
    value = training_args.resume_from_checkpoint
    if value is None or value is False or str(value).strip().lower() in ("", "false", "none"):
        return None
    output_dir = training_args.output_dir
    if value is True or str(value).strip().lower() == "true":
        if quantize:
            from ..training.checkpoints import last_complete_checkpoint

            found = last_complete_checkpoint(output_dir)
        else:
            from transformers.trainer_utils import get_last_checkpoint

            found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise CommandError(
                f"--resume_from_checkpoint true: {output_dir} holds no complete checkpoint-* folder to resume from. "
                "Leave the flag out to start a new run, or pass the checkpoint folder to resume."
            )
        logger.info("Resuming from %s", found)
        return found
    if not os.path.isdir(value):
        raise CommandError(
            f"--resume_from_checkpoint {value!r} is not a folder: pass a checkpoint-* folder written during training, "
            "or true for the newest complete one in --output_dir."
        )
    return value


def _check_search_options(training_args, model_args, quantize: bool) -> None:
    """Rotation-search options that cannot take effect are refused (RoSTE) or warned about (quantize=false)."""
    interval = training_args.rotation_search_interval
    if not quantize:
        for name in ("rotation_search", "rotation_search_interval"):
            if getattr(training_args, name) not in (None, "none"):
                logger.warning("quantize=false: %s=%r is ignored (full-precision SFT baseline, no rotations).", name,
                               getattr(training_args, name))
        return
    # 'none' + interval is refused by RoSTESFTConfig itself, while the arguments are parsed
    if interval and model_args.use_peft:
        raise CommandError(
            f"--rotation_search_interval {interval} is not supported with --use_peft true: a re-search rotates the "
            "base weights under LoRA adapters trained in the old rotation. With LoRA the search runs once, at train "
            "start: drop --rotation_search_interval."
        )


def run_sft(script_args, training_args, model_args, roste_args):
    """Load data, tokenizer and model, train, `save_model`; returns the trainer."""
    from trl import SFTTrainer, get_peft_config

    from ..data import MissingSplitError, dataset_format
    from ..training.trainer import RoSTESFTTrainer

    if not model_args.model_name_or_path:
        raise CommandError("model_name_or_path is required (YAML key or --model_name_or_path PATH_OR_HUB_ID).")
    if not script_args.dataset_name:
        raise CommandError("dataset_name is required (YAML key or --dataset_name HUB_ID_OR_LOCAL_FILE.jsonl).")
    n = script_args.max_train_samples
    if n is not None and n < 1:
        raise CommandError(f"--max_train_samples {n} is invalid: expected an int >= 1 (or leave it unset).")
    check_path_or_hub_id("sft", "--model_name_or_path", model_args.model_name_or_path)
    if script_args.tokenizer_name_or_path:
        check_path_or_hub_id("sft", "--tokenizer_name_or_path", script_args.tokenizer_name_or_path)
    check_output_dir("--output_dir", training_args.output_dir)
    _check_search_options(training_args, model_args, roste_args.quantize)
    resume = _resume_checkpoint(training_args, roste_args.quantize)
    _check_world_size(script_args, training_args)

    streaming = script_args.dataset_streaming
    train_dataset = load_dataset_arg("--dataset_name", script_args.dataset_name, script_args.dataset_config,
                                     split=script_args.dataset_train_split, split_flag="--dataset_train_split",
                                     streaming=streaming)
    columns = getattr(train_dataset, "column_names", None)
    if columns is not None:
        try:
            dataset_format(columns)
        except ValueError as exc:
            raise CommandError(f"--dataset_name {script_args.dataset_name}: {exc} Rename the columns.") from None
    if n is not None and not streaming and n < len(train_dataset):
        train_dataset = train_dataset.shuffle(seed=training_args.seed).select(range(n))
    eval_dataset = None
    eval_strategy = str(getattr(training_args, "eval_strategy", "no"))
    if eval_strategy not in ("no", "IntervalStrategy.NO"):
        try:
            eval_dataset = load_dataset_arg("--dataset_name", script_args.dataset_name, script_args.dataset_config,
                                            split=script_args.dataset_test_split, split_flag="--dataset_test_split",
                                            streaming=streaming)
        except CommandError as exc:
            missing = exc.__cause__
            if not isinstance(missing, MissingSplitError):
                raise
            raise CommandError(
                f"--eval_strategy {eval_strategy.split('.')[-1].lower()} evaluates on split {missing.split!r} "
                f"(--dataset_test_split), but {missing.name} has no such split (available: "
                f"{', '.join(missing.available)}). Pass --dataset_test_split with one of those, or --eval_strategy no."
            ) from None

    tokenizer = load_tokenizer(script_args.tokenizer_name_or_path or model_args.model_name_or_path,
                               revision=model_args.model_revision if not script_args.tokenizer_name_or_path else None,
                               flag="--tokenizer_name_or_path")
    peft_config = get_peft_config(model_args)
    revision = model_args.model_revision if model_args.model_revision != "main" else None

    if roste_args.quantize:
        if roste_args.rotation_config is not None and training_args.rotation_search != "none":
            if training_args.rotation_search_interval:
                logger.warning("--rotation_config %s is replaced by the search at train start (--rotation_search %s "
                               "with --rotation_search_interval %d re-searches during training).",
                               roste_args.rotation_config, training_args.rotation_search,
                               training_args.rotation_search_interval)
            else:  # the file fixes the rotations: a search at train start would replace them
                logger.info("--rotation_config %s fixes the per-layer rotations: rotation_search %r -> 'none'.",
                            roste_args.rotation_config, training_args.rotation_search)
                training_args.rotation_search = "none"
        qc = roste_args.to_roste_config(training_args.rotation_search)
        logger.info("RoSTE QA-SFT: %s, rotations %s", qc.scheme_name, list(qc.rotations) or "none")
        model = load_model_arg("--model_name_or_path", model_args.model_name_or_path, quantization_config=qc,
                               dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
                               revision=revision)
        trainer = RoSTESFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config)
    else:
        logger.info("Full-precision SFT baseline (quantize=false): TRL SFTTrainer.")
        model = load_model_arg("--model_name_or_path", model_args.model_name_or_path, dtype=model_args.dtype,
                               attn_implementation=model_args.attn_implementation, revision=revision)
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config)

    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("Saved the trained model to %s", training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer
