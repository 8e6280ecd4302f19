"""Model cards for RoSTE checkpoints pushed to the Hub.

`render_model_card(config, repo_id=..., ...)` fills the Jinja template `model_cards/roste_model_card.md.j2`
with YAML metadata (parsed back by `huggingface_hub.ModelCard`), a quantization table, the per-layer
rotation configuration in compact form, training hyperparameters and evaluation results when known,
a usage snippet, and a reference to the plot written by `plot_rotation_errors`.

`library_name` is `transformers`: the checkpoint loads through transformers' `from_pretrained` (hf_roste
is a transformers quantizer plugin, not a separate runtime), so the Hub's transformers filters and
architecture widgets apply. Loading without `import hf_roste` fails loudly (the packed layers' empty
`weight` marker has the wrong shape), and the card's usage snippet shows the import; the `hf_roste`
and `roste` tags identify the library.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import PER_LAYER_ROTATIONS, RoSTEConfig

PLOT_FILE = "roste_rotation_errors.png"
TEMPLATE_NAME = "roste_model_card.md.j2"
#: Training arguments copied into the card when present (in this order).
TRAINING_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay", "optim", "max_length", "bf16", "fp16",
    "seed", "completion_only_loss", "rotation_search", "rotation_search_criterion", "rotation_calibration_samples",
    "rotation_search_interval",
)


def template_dir() -> Path:
    """The folder holding the card templates (`model_cards/` next to the package)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "model_cards", here.parents[1] / "model_cards"):
        if (candidate / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"The model card template {TEMPLATE_NAME} was not found next to hf_roste (looked in model_cards/); "
        "reinstall hf_roste from its source tree."
    )


def _on_off_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    idx, parts, i = list(indices), [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(parts)


def rotation_summary(config: RoSTEConfig, num_layers: int | None = None) -> str:
    """The per-layer rotation configuration in compact form (Markdown bullet list)."""
    rc = config.rotation_config
    if rc is None:
        if num_layers is None:
            return f"Rotations allowed: {', '.join(config.rotations) or 'none'}; not searched yet."
        rc = config.resolved_rotation_config(num_layers)
    layers = rc["layers"]
    n = len(layers)
    lines = [f"- R1 (residual stream, fused into every weight): {'on' if rc['R1'] else 'off'}"]
    what = {"R2": "V/O per head, fused", "R3": "Q/K online, before K/V quantization", "R4": "down_proj input, online"}
    for name in PER_LAYER_ROTATIONS:
        on = [i for i, flags in enumerate(layers) if flags[name]]
        if not on:
            desc = "off in every layer"
        elif len(on) == n:
            desc = f"on in all {n} layers"
        else:
            desc = f"on in {len(on)}/{n} layers: {_on_off_ranges(on)}"
        lines.append(f"- {name} ({what[name]}): {desc}")
    origin = rc.get("strategy", "search") if config.rotation_config is not None else f"default ({config.rotation_search})"
    extra = f"; criterion `{rc['criterion']}`" if rc.get("criterion") else ""
    lines.append(f"- decided by: `{origin}`{extra}; rotation seed {config.rotation_seed}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def error_rows(config: RoSTEConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of the per-layer error table from `rotation_config['errors']` (kept setting in bold)."""
    rc = config.rotation_config or {}
    errors = rc.get("errors")
    types = [t for t in PER_LAYER_ROTATIONS if any(t in e for e in errors or ())]
    if not types:  # nothing measured, or no per-layer rotation allowed (e.g. rotations=("R1",))
        return [], []
    rows = []
    for i, (flags, errs) in enumerate(zip(rc["layers"], errors, strict=False)):
        cells = []
        for t in types:
            if t not in errs:
                cells.append("-")
                continue
            off, on = (_fmt(float(x)) for x in errs[t])
            cells.append(f"{off} / **{on}**" if flags[t] else f"**{off}** / {on}")
        rows.append({"layer": i, "cells": cells})
    return types, rows


def plot_rotation_errors(config: RoSTEConfig, path: str | os.PathLike) -> bool:
    """Write a PNG of the per-layer quantization error with and without each rotation.

    Returns False (and writes nothing) when the configuration has no measured errors (also when no
    per-layer rotation was allowed). matplotlib is imported lazily, with the Agg backend.
    """
    rc = config.rotation_config or {}
    errors = rc.get("errors")
    types = [t for t in PER_LAYER_ROTATIONS if any(t in e for e in errors or ())]
    if not types:
        return False
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "The model card's rotation-error plot needs matplotlib: pip install 'hf-roste[eval]'."
        ) from exc

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.4), squeeze=False)
    for ax, t in zip(axes[0], types, strict=True):
        xs = [i for i, e in enumerate(errors) if t in e]
        off = [errors[i][t][0] for i in xs]
        on = [errors[i][t][1] for i in xs]
        ax.plot(xs, off, "o-", label="without rotation", color="tab:red")
        ax.plot(xs, on, "s-", label="with rotation", color="tab:blue")
        kept = [i for i in xs if rc["layers"][i][t]]
        if kept:
            ax.scatter(kept, [errors[i][t][1] for i in kept], s=90, facecolors="none", edgecolors="k",
                       label="kept on", zorder=3)
        if all(v > 0 for v in off + on) and max(off + on) / max(min(off + on), 1e-30) > 20:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{t}")
        ax.set_xlabel("layer")
        ax.set_ylabel("quantization error")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"RoSTE {config.scheme_name.upper()}: per-layer quantization error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _granularity(config: RoSTEConfig, what: str) -> str:
    if what == "weight":
        return "per output channel" if config.weight_group_size is None else f"groups of {config.weight_group_size}"
    return {"activation": "per token (dynamic)", "kv": "per token per head (dynamic)"}[what]


def quant_rows(config: RoSTEConfig) -> list[dict[str, Any]]:
    rows = []
    for what, name in (("weight", "linear weights"), ("activation", "linear inputs"), ("kv", "K/V cache")):
        bits = getattr(config, f"{what}_bits")
        rows.append({
            "name": name,
            "bits": bits if bits < 16 else "16 (not quantized)",
            "symmetric": "yes" if getattr(config, f"{what}_symmetric") else "no",
            "granularity": _granularity(config, what),
            "clip": _fmt(getattr(config, f"{what}_clip_ratio")),
        })
    return rows


def _training_rows(training_args: Any) -> list[tuple[str, str]]:
    if training_args is None:
        return []
    data = training_args.to_dict() if hasattr(training_args, "to_dict") else dict(training_args)
    rows = []
    for key in TRAINING_KEYS:
        value = data.get(key)
        if value is None or (key == "max_steps" and value == -1) or (key in ("bf16", "fp16") and not value):
            continue
        if key.startswith("warmup") and not value:
            continue
        rows.append((key, _fmt(value)))
    return rows


def _eval_rows(eval_results: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not eval_results:
        return []
    rows = []
    for k, v in eval_results.items():
        if isinstance(v, float) and not math.isfinite(v):
            continue
        rows.append((str(k), _fmt(v)))
    return rows


def card_metadata(config: RoSTEConfig, *, base_model: str | None = None, datasets: Sequence[str] | str | None = None,
                  tags: Sequence[str] | None = None, license: str | None = None,
                  language: Sequence[str] | str | None = None) -> dict[str, Any]:
    """The card's YAML metadata (keys as the Hub reads them)."""
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    if license:
        meta["license"] = license
    if language:
        meta["language"] = [language] if isinstance(language, str) else list(language)
    if datasets:
        meta["datasets"] = [datasets] if isinstance(datasets, str) else list(datasets)
    all_tags = ["roste", "hf_roste", config.scheme_name, "quantized", "qat", "rotation"]
    all_tags += [f"{config.weight_bits}-bit"] if config.weight_bits < 16 else []
    for t in tags or ():
        if t not in all_tags:
            all_tags.append(t)
    meta["tags"] = all_tags
    return meta


def render_model_card(
    config: RoSTEConfig,
    *,
    repo_id: str,
    base_model: str | None = None,
    datasets: Sequence[str] | str | None = None,
    training_args: Any = None,
    eval_results: Mapping[str, Any] | None = None,
    plot_file: str | None = PLOT_FILE,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    language: Sequence[str] | str | None = None,
    title: str | None = None,
    num_layers: int | None = None,
) -> str:
    """The README.md text of a RoSTE model repository (see the module docstring)."""
    import jinja2

    from .._version import __version__

    meta = card_metadata(config, base_model=base_model, datasets=datasets, tags=tags, license=license,
                         language=language)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir())), autoescape=False,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    types, rows = error_rows(config)
    skip = config.modules_to_not_convert or ["lm_head"]
    return env.get_template(TEMPLATE_NAME).render(
        metadata_yaml=yaml.safe_dump(meta, sort_keys=False).strip(),
        title=title or repo_id.split("/")[-1],
        base_model=base_model,
        repo_id=repo_id,
        scheme=config.scheme_name,
        checkpoint_format=config.checkpoint_format or "packed",
        quant_rows=quant_rows(config),
        not_converted=", ".join(f"`{m}`" for m in skip) + ", embeddings and norms",
        rotation_summary=rotation_summary(config, num_layers),
        error_types=types,
        error_rows=rows,
        plot_file=plot_file,
        training_rows=_training_rows(training_args),
        eval_rows=_eval_rows(eval_results),
        version=__version__,
    )
