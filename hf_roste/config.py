"""`RoSTEConfig`: the quantization configuration of a RoSTE model.

It is a transformers `QuantizationConfigMixin`, so it travels in `config.json` under
`quantization_config` with `quant_method: "roste"`. Every field is validated on construction and on
`from_dict`; errors name the field, the value received and what is accepted.

`rotation_config` has one JSON shape, written by the search and read by the loader::

    {"R1": true,
     "layers": [{"R2": true, "R3": false, "R4": true}, ...],      # one entry per decoder layer, in order
     "errors": [{"R2": [off, on], "R3": [off, on], "R4": [off, on]}, ...]}   # optional, measured by the search

`None` means "no per-layer choice yet": with `rotation_search="all"` every R2/R3/R4 allowed by
`rotations` is on, with `"none"` all are off, and with `"adaptive"` or `"layerwise"` all are off until
`search_rotation_config` (or `RoSTESFTTrainer`) runs that search and fills the field in.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .numerics import SUPPORTED_BITS, QuantSpec

logger = logging.get_logger(__name__)

QUANT_METHOD = "roste"
#: Version of the `quantization_config` layout written by this library. A checkpoint with a newer
#: version is refused; older ones are read.
FORMAT_VERSION = 1

ROTATION_NAMES = ("R1", "R2", "R3", "R4")
PER_LAYER_ROTATIONS = ("R2", "R3", "R4")
#: The searches `search_rotation_config(strategy=...)` runs: "adaptive" (the paper) and "layerwise".
SEARCH_ALGORITHMS = ("adaptive", "layerwise")
#: `rotation_search`, the same vocabulary in `RoSTEConfig` and `RoSTESFTConfig`: how per-layer R2/R3/R4 are
#: chosen. "adaptive" / "layerwise": by that search (all off until it runs); "all": every allowed rotation on,
#: no search; "none": no search (a fresh model has every per-layer rotation off).
SEARCH_STRATEGIES = ("adaptive", "all", "none", "layerwise")
#: The error a search compares (`search_rotation_config(criterion=...)`).
SEARCH_CRITERIA = ("paper", "output")
CHECKPOINT_FORMATS = ("master", "packed")
#: Exclusive upper bound of `rotation_seed` (torch generators take 64-bit seeds; R2 of layer i uses seed + 1 + i).
MAX_SEED = 2**63


@dataclass(frozen=True)
class ConfigField:
    """One user-facing `RoSTEConfig` field: the only place its name, type, default and help are written.

    `RoSTEConfig.__init__`, `to_dict`, `FIELD_HELP` and the `hf-roste sft` arguments
    (`commands/sft.py`'s `RoSTEArguments`) are all built from `CONFIG_FIELDS`.
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None


CONFIG_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("weight_bits", int, 4, "Bits of linear-layer weights: 2, 3, 4, 8, or 16 (16 = not quantized).",
                SUPPORTED_BITS),
    ConfigField("activation_bits", int, 4,
                "Bits of linear-layer input activations (per token): 2, 3, 4, 8, or 16.", SUPPORTED_BITS),
    ConfigField("kv_bits", int, 4,
                "Bits of the K and V cache (per token per head, after RoPE and R3): 2, 3, 4, 8, or 16.", SUPPORTED_BITS),
    ConfigField("weight_symmetric", bool, False, "Symmetric (zero point 0) weight quantization; the paper uses asymmetric."),
    ConfigField("activation_symmetric", bool, False, "Symmetric activation quantization; the paper uses asymmetric."),
    ConfigField("kv_symmetric", bool, False, "Symmetric K/V quantization; the paper uses asymmetric."),
    ConfigField("weight_clip_ratio", float, 0.95, "Clip factor c in (0, 1] applied to the weight range (paper: 0.95)."),
    ConfigField("activation_clip_ratio", float, 0.95,
                "Clip factor c in (0, 1] applied to the activation range (paper: 0.95)."),
    ConfigField("kv_clip_ratio", float, 0.95, "Clip factor c in (0, 1] applied to the K/V range (paper: 0.95)."),
    ConfigField("weight_group_size", int | None, None,
                "Weight group size along the input dim; None = one scale per output channel."),
    ConfigField("rotations", tuple[str, ...], ROTATION_NAMES,
                "Rotations that may be used, a subset of R1 (residual), R2 (V/O per head), R3 (Q/K online), "
                "R4 (down_proj input online)."),
    ConfigField("rotation_search", str, "adaptive",
                "How per-layer R2/R3/R4 are chosen while rotation_config is None: 'adaptive' (the paper's search; "
                "off until it runs), 'layerwise' (adaptive, then a whole-model check; off until it runs), 'all' "
                "(every rotation on), 'none' (every rotation off).", SEARCH_STRATEGIES),
    ConfigField("rotation_config", dict | None, None,
                "Per-layer on/off result {'R1': bool, 'layers': [{'R2','R3','R4'}...]}; filled by the search."),
    ConfigField("rotation_seed", int, 0, "Seed of the random signs of the R1 and R2 Hadamard rotations."),
    ConfigField("modules_to_not_convert", list[str] | None, None,
                "Module names (or name suffixes) kept in full precision; default: lm_head."),
)

FIELD_HELP: dict[str, str] = {f.name: f.help for f in CONFIG_FIELDS}
#: Fields hf_roste writes itself (not user settings): `format_version` and `checkpoint_format`.
_LIBRARY_FIELDS = {"format_version": FORMAT_VERSION, "checkpoint_format": None}


def _err(field: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"RoSTEConfig.{field}={value!r} is invalid: expected {accepted}.")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"RoSTEConfig.{field} must be a bool (true/false), got {type(value).__name__} {value!r}.")
    return value


def _check_bits(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"RoSTEConfig.{field} must be an int in {SUPPORTED_BITS}, got {type(value).__name__} {value!r}.")
    if value not in SUPPORTED_BITS:
        raise _err(field, value, f"one of {SUPPORTED_BITS} (16 disables that quantizer)")
    return value


def _check_clip(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RoSTEConfig.{field} must be a float in (0, 1], got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise _err(field, value, "a float in (0, 1], e.g. 0.95 as in the paper")
    return value


def validate_rotation_config(value: Any, num_layers: int | None = None) -> dict | None:
    """Check the documented `rotation_config` JSON shape; return a normalised deep copy (or None).

    Raises `ValueError`/`TypeError` naming the offending entry. `num_layers`, when given, must
    match the number of layer entries.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(
            "RoSTEConfig.rotation_config must be None or a dict "
            "{'R1': bool, 'layers': [{'R2': bool, 'R3': bool, 'R4': bool}, ...]}, "
            f"got {type(value).__name__} {_short(value)}."
        )
    unknown = set(value) - {"R1", "layers", "errors", "criterion", "strategy"}
    if unknown:
        raise ValueError(
            f"RoSTEConfig.rotation_config has unknown keys {sorted(unknown)}; accepted keys: "
            "'R1', 'layers', 'errors', 'criterion', 'strategy'."
        )
    if "R1" not in value or "layers" not in value:
        raise ValueError("RoSTEConfig.rotation_config needs both 'R1' (bool) and 'layers' (list of per-layer flags).")
    out: dict[str, Any] = {"R1": _check_bool("rotation_config['R1']", value["R1"])}
    layers = value["layers"]
    if not isinstance(layers, list):
        raise TypeError(
            "RoSTEConfig.rotation_config['layers'] must be a list of {'R2': bool, 'R3': bool, 'R4': bool} dicts, "
            f"got {type(layers).__name__} {_short(layers)}."
        )
    if num_layers is not None and len(layers) != num_layers:
        raise ValueError(
            f"RoSTEConfig.rotation_config has {len(layers)} layer entries but the model has {num_layers} "
            "decoder layers; the search writes one entry per layer, in order."
        )
    norm_layers = []
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or set(entry) != set(PER_LAYER_ROTATIONS):
            raise ValueError(
                f"RoSTEConfig.rotation_config['layers'][{i}]={entry!r} is invalid: expected a dict with exactly "
                "the keys 'R2', 'R3', 'R4' mapped to bools."
            )
        norm_layers.append({k: _check_bool(f"rotation_config['layers'][{i}]['{k}']", entry[k]) for k in PER_LAYER_ROTATIONS})
    out["layers"] = norm_layers
    if "errors" in value and value["errors"] is not None:
        errors = value["errors"]
        if not isinstance(errors, list) or len(errors) != len(layers):
            raise ValueError("RoSTEConfig.rotation_config['errors'] must be a list with one entry per layer.")
        for i, entry in enumerate(errors):
            if not isinstance(entry, dict):
                raise TypeError(f"RoSTEConfig.rotation_config['errors'][{i}] must be a dict, got {type(entry).__name__}.")
            for k, pair in entry.items():
                ok = k in PER_LAYER_ROTATIONS and isinstance(pair, (list, tuple)) and len(pair) == 2
                if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair):
                    raise ValueError(
                        f"RoSTEConfig.rotation_config['errors'][{i}][{k!r}]={pair!r} is invalid: expected "
                        "[error_off, error_on] floats under a key R2, R3 or R4."
                    )
        out["errors"] = [{k: [float(v) for v in pair] for k, pair in e.items()} for e in errors]
    for key in ("criterion", "strategy"):
        if key in value:
            if not isinstance(value[key], str):
                raise TypeError(f"RoSTEConfig.rotation_config['{key}'] must be a string.")
            out[key] = value[key]
    return out


class RoSTEConfig(QuantizationConfigMixin):
    """Configuration of RoSTE quantization-aware fine-tuning (weights, activations, KV cache).

    Pass it to `AutoModelForCausalLM.from_pretrained(..., quantization_config=RoSTEConfig())` to get
    a rotated, fake-quantized model ready for QA-SFT. Defaults are the paper's W4A4KV4 setting:
    asymmetric quantizers with clip ratio 0.95, weights per output channel, activations per token,
    K/V per token per head, all four rotations allowed and chosen by the adaptive search.

    Every field (name, type, default, help) is declared once, in `CONFIG_FIELDS`; help is also in `FIELD_HELP`. Fields set by the library itself, not by users:
    `format_version` and `checkpoint_format` (`None` for a config passed to load a full-precision
    checkpoint; `"master"` or `"packed"` in a saved RoSTE checkpoint).
    """

    def __init__(self, **kwargs: Any) -> None:
        fields = {f.name: kwargs.pop(f.name) if f.name in kwargs else copy.deepcopy(f.default) for f in CONFIG_FIELDS}
        fields.update({name: kwargs.pop(name, default) for name, default in _LIBRARY_FIELDS.items()})
        self._init_fields(**fields, **kwargs)

    def _init_fields(
        self,
        weight_bits: int,
        activation_bits: int,
        kv_bits: int,
        weight_symmetric: bool,
        activation_symmetric: bool,
        kv_symmetric: bool,
        weight_clip_ratio: float,
        activation_clip_ratio: float,
        kv_clip_ratio: float,
        weight_group_size: int | None,
        rotations: tuple[str, ...] | list[str],
        rotation_search: str,
        rotation_config: dict | None,
        rotation_seed: int,
        modules_to_not_convert: list[str] | None,
        format_version: int,
        checkpoint_format: str | None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"RoSTEConfig got unknown fields {sorted(kwargs)}; accepted fields: {sorted(FIELD_HELP)} "
                "(plus format_version and checkpoint_format written by the library). If this config was saved by "
                "a newer hf_roste, upgrade hf_roste."
            )
        self.weight_bits = _check_bits("weight_bits", weight_bits)
        self.activation_bits = _check_bits("activation_bits", activation_bits)
        self.kv_bits = _check_bits("kv_bits", kv_bits)
        self.weight_symmetric = _check_bool("weight_symmetric", weight_symmetric)
        self.activation_symmetric = _check_bool("activation_symmetric", activation_symmetric)
        self.kv_symmetric = _check_bool("kv_symmetric", kv_symmetric)
        self.weight_clip_ratio = _check_clip("weight_clip_ratio", weight_clip_ratio)
        self.activation_clip_ratio = _check_clip("activation_clip_ratio", activation_clip_ratio)
        self.kv_clip_ratio = _check_clip("kv_clip_ratio", kv_clip_ratio)
        if weight_group_size is not None:
            if isinstance(weight_group_size, bool) or not isinstance(weight_group_size, int):
                raise TypeError(f"RoSTEConfig.weight_group_size must be None or an int, got {weight_group_size!r}.")
            if weight_group_size < 2:
                raise _err("weight_group_size", weight_group_size, "None (per output channel) or an int >= 2, e.g. 128")
        self.weight_group_size = weight_group_size
        if isinstance(rotations, str) or not isinstance(rotations, (list, tuple)):
            raise TypeError(f"RoSTEConfig.rotations must be a list/tuple of names from {ROTATION_NAMES}, got {rotations!r}.")
        bad = [r for r in rotations if r not in ROTATION_NAMES]
        if bad or len(set(rotations)) != len(rotations):
            raise _err("rotations", list(rotations), f"distinct names from {ROTATION_NAMES}")
        self.rotations = tuple(r for r in ROTATION_NAMES if r in rotations)
        if rotation_search not in SEARCH_STRATEGIES:
            raise _err("rotation_search", rotation_search, f"one of {SEARCH_STRATEGIES}")
        self.rotation_search = rotation_search
        self.rotation_config = validate_rotation_config(rotation_config)
        if self.rotation_config is not None:
            self._check_rotation_config_against_rotations(self.rotation_config)
        if isinstance(rotation_seed, bool) or not isinstance(rotation_seed, int) or not 0 <= rotation_seed < MAX_SEED:
            raise _err("rotation_seed", rotation_seed, "a non-negative int below 2**63")
        self.rotation_seed = rotation_seed
        if modules_to_not_convert is not None:
            if isinstance(modules_to_not_convert, str) or not isinstance(modules_to_not_convert, (list, tuple)):
                raise TypeError(
                    f"RoSTEConfig.modules_to_not_convert must be None or a list of module names, got {modules_to_not_convert!r}."
                )
            if not all(isinstance(m, str) and m for m in modules_to_not_convert):
                raise _err("modules_to_not_convert", modules_to_not_convert, "a list of non-empty module names")
            modules_to_not_convert = list(modules_to_not_convert)
        self.modules_to_not_convert = modules_to_not_convert
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise _err("format_version", format_version, f"an int between 1 and {FORMAT_VERSION}")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"This RoSTE checkpoint uses quantization_config format_version {format_version}, but the installed "
                f"hf_roste reads versions up to {FORMAT_VERSION}. Upgrade hf_roste (pip install -U hf-roste)."
            )
        self.format_version = format_version
        if checkpoint_format is not None and checkpoint_format not in CHECKPOINT_FORMATS:
            raise _err("checkpoint_format", checkpoint_format, f"None or one of {CHECKPOINT_FORMATS}")
        self.checkpoint_format = checkpoint_format

    # ------------------------------------------------------------------ helpers
    def _check_rotation_config_against_rotations(self, rc: dict) -> None:
        if rc["R1"] and "R1" not in self.rotations:
            raise ValueError("RoSTEConfig.rotation_config turns R1 on but 'R1' is not in RoSTEConfig.rotations.")
        for i, layer in enumerate(rc["layers"]):
            for name, on in layer.items():
                if on and name not in self.rotations:
                    raise ValueError(
                        f"RoSTEConfig.rotation_config['layers'][{i}] turns {name} on but {name!r} is not in "
                        f"RoSTEConfig.rotations={list(self.rotations)}; add it or turn it off."
                    )

    def default_layer_flags(self) -> dict[str, bool]:
        """Per-layer flags used while `rotation_config` is None (see the module docstring)."""
        on = self.rotation_search == "all"
        return {name: on and name in self.rotations for name in PER_LAYER_ROTATIONS}

    def resolved_rotation_config(self, num_layers: int) -> dict:
        """The explicit per-layer configuration for a model with `num_layers` decoder layers."""
        if self.rotation_config is not None:
            return validate_rotation_config(self.rotation_config, num_layers)
        return {"R1": "R1" in self.rotations, "layers": [self.default_layer_flags() for _ in range(num_layers)]}

    @property
    def weight_spec(self) -> QuantSpec:
        """Quantizer of linear weights `[out, in]`: per output channel or per group along `in`."""
        if self.weight_group_size is None:
            return QuantSpec(self.weight_bits, self.weight_symmetric, self.weight_clip_ratio, "channel")
        return QuantSpec(self.weight_bits, self.weight_symmetric, self.weight_clip_ratio, "group", self.weight_group_size)

    @property
    def activation_spec(self) -> QuantSpec:
        """Quantizer of linear inputs `[..., in]`: per token."""
        return QuantSpec(self.activation_bits, self.activation_symmetric, self.activation_clip_ratio, "token")

    @property
    def kv_spec(self) -> QuantSpec:
        """Quantizer of K and V `[batch, kv_heads, seq, head_dim]`: per token per head."""
        return QuantSpec(self.kv_bits, self.kv_symmetric, self.kv_clip_ratio, "token_head")

    @property
    def scheme_name(self) -> str:
        """Short name such as `w4a4kv4` (used in tags and cards)."""
        return f"w{self.weight_bits}a{self.activation_bits}kv{self.kv_bits}"

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": self.quant_method}
        out.update({name: getattr(self, name) for name in _LIBRARY_FIELDS})
        out.update({f.name: copy.deepcopy(getattr(self, f.name)) for f in CONFIG_FIELDS})
        out["rotations"] = list(self.rotations)
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        if not isinstance(config_dict, dict):
            raise TypeError(f"RoSTEConfig.from_dict expects a dict, got {type(config_dict).__name__}.")
        qm = config_dict.get("quant_method", QUANT_METHOD)
        if qm != QUANT_METHOD:
            raise ValueError(f"RoSTEConfig.from_dict got quant_method={qm!r}; expected {QUANT_METHOD!r}.")
        merged = {**config_dict, **kwargs}
        bad_keys = [k for k in merged if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"RoSTEConfig.from_dict: field names must be strings, got {bad_keys!r}.")
        unknown = sorted(set(merged) - set(FIELD_HELP) - set(_LIBRARY_FIELDS) - {"quant_method"})
        if unknown:
            raise ValueError(
                f"RoSTEConfig got unknown fields {unknown}; accepted fields: {sorted(FIELD_HELP)} (plus format_version "
                "and checkpoint_format written by the library). If this config was saved by a newer hf_roste, upgrade "
                "hf_roste."
            )
        config = cls(**merged)
        return (config, {}) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoSTEConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"RoSTEConfig {self.to_json_string()}"


RoSTEConfig.__init__.__signature__ = inspect.Signature(  # help(RoSTEConfig) / IDEs show the declared fields
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
       for f in CONFIG_FIELDS]
    + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
)
