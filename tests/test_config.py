"""RoSTEConfig: validation with clear errors, and exact (de)serialisation."""

from __future__ import annotations

import json

import pytest

from hf_roste import FORMAT_VERSION, RoSTEConfig
from hf_roste.config import FIELD_HELP

BAD_VALUES = [
    ("weight_bits", 5, ValueError, r"weight_bits=5 .*\(2, 3, 4, 8, 16\)"),
    ("weight_bits", "4", TypeError, r"weight_bits must be an int"),
    ("activation_bits", 1, ValueError, r"activation_bits=1"),
    ("kv_bits", 32, ValueError, r"kv_bits=32"),
    ("kv_bits", True, TypeError, r"kv_bits must be an int"),
    ("weight_symmetric", "yes", TypeError, r"weight_symmetric must be a bool"),
    ("activation_symmetric", 1, TypeError, r"activation_symmetric must be a bool"),
    ("kv_symmetric", None, TypeError, r"kv_symmetric must be a bool"),
    ("weight_clip_ratio", 0.0, ValueError, r"weight_clip_ratio=0.0 .*\(0, 1\]"),
    ("activation_clip_ratio", 1.5, ValueError, r"activation_clip_ratio=1.5"),
    ("kv_clip_ratio", float("nan"), ValueError, r"kv_clip_ratio=nan"),
    ("kv_clip_ratio", "0.9", TypeError, r"kv_clip_ratio must be a float"),
    ("weight_group_size", 1, ValueError, r"weight_group_size=1"),
    ("weight_group_size", 64.0, TypeError, r"weight_group_size must be None or an int"),
    ("rotations", ("R1", "R5"), ValueError, r"rotations=\['R1', 'R5'\]"),
    ("rotations", ("R1", "R1"), ValueError, r"distinct names"),
    ("rotations", "R1", TypeError, r"rotations must be a list/tuple"),
    ("rotation_search", "greedy", ValueError, r"rotation_search='greedy'.*'adaptive', 'all', 'none'"),
    ("rotation_config", [1], TypeError, r"rotation_config must be None or a dict"),
    ("rotation_config", {"R1": True}, ValueError, r"needs both 'R1'"),
    ("rotation_config", {"R1": True, "layers": [{"R2": 1, "R3": True, "R4": True}]}, TypeError, r"\['R2'\] must be a bool"),
    ("rotation_config", {"R1": True, "layers": [{"R2": True}]}, ValueError, r"exactly the keys 'R2', 'R3', 'R4'"),
    ("rotation_config", {"R1": True, "layers": [], "extra": 1}, ValueError, r"unknown keys \['extra'\]"),
    ("rotation_seed", -1, ValueError, r"rotation_seed=-1"),
    ("modules_to_not_convert", "lm_head", TypeError, r"modules_to_not_convert must be None or a list"),
    ("modules_to_not_convert", [""], ValueError, r"modules_to_not_convert"),
    ("checkpoint_format", "gguf", ValueError, r"checkpoint_format='gguf'"),
    ("format_version", 0, ValueError, r"format_version=0"),
]


@pytest.mark.parametrize("field,value,exc,pattern", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _, _ in BAD_VALUES])
def test_each_field_is_validated(field, value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        RoSTEConfig(**{field: value})


def test_every_user_field_has_help_and_a_bad_value_test():
    tested = {f for f, *_ in BAD_VALUES}
    assert set(FIELD_HELP) <= tested


def test_defaults_are_the_papers_w4a4kv4():
    cfg = RoSTEConfig()
    assert (cfg.weight_bits, cfg.activation_bits, cfg.kv_bits) == (4, 4, 4)
    assert not (cfg.weight_symmetric or cfg.activation_symmetric or cfg.kv_symmetric)
    assert cfg.weight_clip_ratio == cfg.activation_clip_ratio == cfg.kv_clip_ratio == 0.95
    assert cfg.rotations == ("R1", "R2", "R3", "R4") and cfg.rotation_search == "adaptive"
    assert cfg.weight_spec.granularity == "channel" and cfg.activation_spec.granularity == "token"
    assert cfg.kv_spec.granularity == "token_head"
    assert RoSTEConfig(weight_group_size=32).weight_spec.group_size == 32
    assert cfg.scheme_name == "w4a4kv4"


def test_round_trip_is_exact():
    rc = {"R1": True, "layers": [{"R2": True, "R3": False, "R4": True}, {"R2": False, "R3": True, "R4": False}],
          "errors": [{"R4": [1.5, 0.25]}, {"R3": [0.1, 0.2]}], "criterion": "paper"}
    cfg = RoSTEConfig(weight_bits=3, kv_symmetric=True, weight_group_size=64, rotations=["R4", "R1", "R3", "R2"],
                      rotation_config=rc, rotation_seed=7, modules_to_not_convert=["down_proj"])
    d = cfg.to_dict()
    assert d["quant_method"] == "roste" and d["format_version"] == FORMAT_VERSION
    again = RoSTEConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg and again.to_dict() == d
    assert json.loads(again.to_json_string()) == d
    assert again.rotations == ("R1", "R2", "R3", "R4")


def test_unknown_and_newer_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown fields \['weight_bitz'\]"):
        RoSTEConfig.from_dict({"quant_method": "roste", "weight_bitz": 4})
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        RoSTEConfig.from_dict({"quant_method": "roste", "format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="quant_method='awq'"):
        RoSTEConfig.from_dict({"quant_method": "awq"})


def test_rotation_config_must_agree_with_rotations():
    with pytest.raises(ValueError, match="turns R2 on but 'R2' is not in"):
        RoSTEConfig(rotations=("R1",), rotation_config={"R1": True, "layers": [{"R2": True, "R3": False, "R4": False}]})
    with pytest.raises(ValueError, match="turns R1 on"):
        RoSTEConfig(rotations=("R4",), rotation_config={"R1": True, "layers": []})


def test_default_flags_follow_rotation_search():
    assert RoSTEConfig(rotation_search="all").default_layer_flags() == {"R2": True, "R3": True, "R4": True}
    assert RoSTEConfig(rotation_search="all", rotations=("R4",)).default_layer_flags() == {"R2": False, "R3": False, "R4": True}
    assert RoSTEConfig(rotation_search="none").default_layer_flags() == {"R2": False, "R3": False, "R4": False}
    assert RoSTEConfig().default_layer_flags() == {"R2": False, "R3": False, "R4": False}


def test_cli_arguments_are_generated_from_the_field_declaration():
    """`hf-roste sft`'s RoSTEArguments repeat no default or help: both come from CONFIG_FIELDS."""
    import dataclasses

    from hf_roste.commands.sft import RoSTEArguments
    from hf_roste.config import CONFIG_FIELDS

    fields = {f.name: f for f in dataclasses.fields(RoSTEArguments)}
    for decl in CONFIG_FIELDS:
        if decl.name in ("rotation_search", "rotation_config"):  # RoSTESFTConfig's field / a JSON file path
            continue
        f = fields[decl.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert list(default) == list(decl.default) if decl.name == "rotations" else default == decl.default
        assert f.metadata["help"].startswith(decl.help)
        assert f.metadata.get("choices") == (list(decl.choices) if decl.choices else None)
    assert RoSTEArguments().to_roste_config() == RoSTEConfig()
