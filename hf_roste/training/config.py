"""`RoSTESFTConfig`: TRL's `SFTConfig` plus the rotation-search options of RoSTE."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..config import SEARCH_CRITERIA, SEARCH_STRATEGIES


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

    def __post_init__(self) -> None:
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
