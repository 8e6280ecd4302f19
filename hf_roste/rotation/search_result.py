"""`RotationSearchResult`: the outcome of the rotation search, as data, Markdown and a log table."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..config import PER_LAYER_ROTATIONS


@dataclass
class RotationSearchResult:
    """Outcome of `search_rotation_config`.

    Attributes:
        rotation_config: the applied configuration (the JSON shape of `RoSTEConfig.rotation_config`,
            with "errors", "criterion" and "strategy").
        errors: per layer `{type: (error_off, error_on)}` for the searched types (floats, see
            `search_stats` for the normalisation: per non-padding token, weight terms as totals).
        totals: sum over layers and searched types of the error with everything "off", "on", and
            with the "chosen" configuration (adaptive choice: always <= both extremes).
        whole_model: layerwise only: mean KL per token for "all_off", "all_on", "adaptive", "final".
        tokens: non-padding calibration tokens (all ranks); `samples`: calibration rows.
        seconds: wall time of the search.
    """

    rotation_config: dict
    errors: list[dict[str, tuple[float, float]]]
    criterion: str
    strategy: str
    totals: dict[str, float]
    tokens: int
    samples: int
    seconds: float
    whole_model: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[dict[str, bool]]:
        return self.rotation_config["layers"]

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: `layer`, `R2`/`R3`/`R4` (on/off) and `<type>_error` = `[off, on]`."""
        rows = []
        for i, (flags, errs) in enumerate(zip(self.layers, self.errors, strict=True)):
            row: dict[str, Any] = {"layer": i, **flags}
            for name in PER_LAYER_ROTATIONS:
                row[f"{name}_error"] = list(errs[name]) if name in errs else None
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        """The per-layer table as Markdown (for model cards)."""
        head = "| layer | R2 | R3 | R4 | R2 error off / on | R3 error off / on | R4 error off / on |"
        lines = [head, "|---:|:---:|:---:|:---:|---:|---:|---:|"]
        for row in self.table():
            cells = [str(row["layer"])] + ["on" if row[n] else "off" for n in PER_LAYER_ROTATIONS]
            for n in PER_LAYER_ROTATIONS:
                e = row[f"{n}_error"]
                cells.append("-" if e is None else f"{e[0]:.4g} / {e[1]:.4g}")
            lines.append("| " + " | ".join(cells) + " |")
        t = self.totals
        lines.append(f"\nTotal error ({self.criterion} criterion): all off {t['off']:.4g}, all on {t['on']:.4g}, "
                     f"chosen {t['chosen']:.4g}.")
        if self.whole_model:
            w = self.whole_model
            lines.append("Whole-model KL per token: " + ", ".join(f"{k} {v:.4g}" for k, v in w.items()) + ".")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rotation_config": copy.deepcopy(self.rotation_config), "table": self.table(), "criterion": self.criterion,
            "strategy": self.strategy, "totals": dict(self.totals), "whole_model": dict(self.whole_model),
            "tokens": self.tokens, "samples": self.samples, "seconds": self.seconds,
        }


def layer_table(result: RotationSearchResult) -> str:
    """The per-layer table as fixed-width text (logged at INFO by the search)."""
    lines = ["layer  R2   R3   R4   | R2 err off/on          | R3 err off/on          | R4 err off/on"]
    for row in result.table():
        flags = "  ".join(f"{'on ' if row[n] else 'off'}" for n in PER_LAYER_ROTATIONS)
        errs = []
        for n in PER_LAYER_ROTATIONS:
            e = row[f"{n}_error"]
            errs.append("-".ljust(22) if e is None else f"{e[0]:10.4g} / {e[1]:<9.4g}")
        lines.append(f"{row['layer']:5d}  {flags}  | " + " | ".join(errs))
    t = result.totals
    lines.append(f"total ({result.criterion}): off {t['off']:.4g}, on {t['on']:.4g}, chosen {t['chosen']:.4g}")
    if result.whole_model:
        lines.append("whole-model KL/token: " + ", ".join(f"{k} {v:.4g}" for k, v in result.whole_model.items()))
    return "\n".join(lines)
