"""`RoSTESFTConfig`: TRL's `SFTConfig` plus the rotation-search options of RoSTE."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from ..config import SEARCH_CRITERIA, SEARCH_STRATEGIES

# transformers renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns on every
# construction); TRL's SFTConfig still sets the old name's default to True
_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in TrainingArguments.__dataclass_fields__

CALIBRATION_SOURCES = ("train_sample", "first_prompts")


@dataclass
class RoSTESFTConfig(SFTConfig):
    """Configuration of `RoSTESFTTrainer`. Every `SFTConfig` / `TrainingArguments` field still works.

    The rotation search runs before the optimizer exists, on calibration samples drawn from the
    training data through the trainer's own collator.
    """

    rotation_search: str | None = field(
        default=None,
        metadata={
            "help": "How per-layer R2/R3/R4 are chosen at train start (same values as RoSTEConfig.rotation_search): "
            "'adaptive' (the paper's search), 'layerwise' (adaptive, then a check of the mixed configuration as a "
            "whole), 'all' (every allowed rotation on, no search), 'none' (no search: the model keeps its rotations). "
            "Default (None): the model's RoSTEConfig.rotation_search, searching when it names a search and no "
            "configuration was chosen yet.",
            "choices": [None, *SEARCH_STRATEGIES],
        },
    )
    rotation_search_criterion: str = field(
        default="paper",
        metadata={
            "help": "Error the search compares: 'paper' (weight + input quantization error) or 'output' "
            "(error of each quantized linear's output).",
            "choices": list(SEARCH_CRITERIA),
        },
    )
    rotation_calibration_samples: int = field(
        default=128, metadata={"help": "Number of training samples used to calibrate the rotation search."}
    )
    rotation_calibration_source: str = field(
        default="train_sample",
        metadata={
            "help": "Where the search's calibration samples come from: 'train_sample' (random training examples, prompt "
            "and completion, through the trainer's collator) or 'first_prompts' (the first N training examples' "
            "'prompt' text only, in dataset order: the RoSTE authors' rotate_model_r234_quant_error.py).",
            "choices": list(CALIBRATION_SOURCES),
        },
    )
    rotation_calibration_max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate each calibration sample to this many tokens, keeping its start (the authors: 512). "
                  "None = as the collator gives it (max_length)."},
    )
    rotation_search_interval: int | None = field(
        default=None,
        metadata={"help": "Re-run the search every N optimizer steps (the paper's outer loop, K > 1). None = once."},
    )
    rotation_search_seed: int | None = field(
        default=None, metadata={"help": "Seed of the calibration sample draw (default: the training seed)."}
    )
    log_quantization_error: bool = field(
        default=True,
        metadata={"help": "Log per-layer relative quantization errors (weights and inputs) at every logging step."},
    )

    if _HAS_ACTIVATION_CHECKPOINTING:
        gradient_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers); use that name."},
        )
        activation_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Recompute activations in the backward pass to save memory (~20% slower). Default: "
                      "True, TRL's default (set with the old name `gradient_checkpointing` when given)."},
        )

    def __post_init__(self) -> None:
        if _HAS_ACTIVATION_CHECKPOINTING and self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under transformers' current name (no warning)
        super().__post_init__()
        if self.rotation_search not in (None, *SEARCH_STRATEGIES):
            raise ValueError(
                f"RoSTESFTConfig.rotation_search={self.rotation_search!r} is invalid: expected None or one of "
                f"{SEARCH_STRATEGIES}."
            )
        if self.rotation_search_criterion not in SEARCH_CRITERIA:
            raise ValueError(
                f"RoSTESFTConfig.rotation_search_criterion={self.rotation_search_criterion!r} is invalid: expected one "
                f"of {SEARCH_CRITERIA}."
            )
        n = self.rotation_calibration_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"RoSTESFTConfig.rotation_calibration_samples={n!r} is invalid: expected an int >= 1 (paper: 128).")
        if self.rotation_calibration_source not in CALIBRATION_SOURCES:
            raise ValueError(
                f"RoSTESFTConfig.rotation_calibration_source={self.rotation_calibration_source!r} is invalid: expected "
                f"one of {CALIBRATION_SOURCES}."
            )
        m = self.rotation_calibration_max_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(
                f"RoSTESFTConfig.rotation_calibration_max_length={m!r} is invalid: expected None or an int >= 1 "
                "(the authors: 512)."
            )
        k = self.rotation_search_interval
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise ValueError(
                f"RoSTESFTConfig.rotation_search_interval={k!r} is invalid: expected None (search once) or an int >= 1 "
                "(re-search every N optimizer steps)."
            )
        if k is not None and self.rotation_search in ("none", "all"):
            raise ValueError(
                f"RoSTESFTConfig.rotation_search={self.rotation_search!r} contradicts rotation_search_interval={k}: "
                f"{self.rotation_search!r} never searches. Set rotation_search_interval=None, or choose "
                "rotation_search='adaptive' (or 'layerwise') to re-search every N steps."
            )
        if not isinstance(self.log_quantization_error, bool):
            raise ValueError(
                f"RoSTESFTConfig.log_quantization_error={self.log_quantization_error!r} is invalid: expected a bool."
            )
        s = self.rotation_search_seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ValueError(f"RoSTESFTConfig.rotation_search_seed={s!r} is invalid: expected None or an int >= 0.")
