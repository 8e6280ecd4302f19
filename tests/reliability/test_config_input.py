"""Config input: every field rejects bad values with a message naming field, value and what is accepted;
unknown keys and newer format versions in a saved config.json are refused; `from_dict` is fuzzed."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from hf_roste import FORMAT_VERSION, RoSTEConfig
from hf_roste.config import FIELD_HELP, MAX_SEED

from ._figures import record

# field -> (bad values, words every error must contain besides the field name)
ROSTE_BAD = {
    "weight_bits": ([5, 0, -4, 1, 32, "4", 4.0, True, None, [4]], ["2, 3, 4, 8, 16"]),
    "activation_bits": ([7, "8", 8.5, False, None], ["2, 3, 4, 8, 16"]),
    "kv_bits": ([1, 9, "16", None, {}], ["2, 3, 4, 8, 16"]),
    "weight_symmetric": (["yes", 1, 0, None, 1.0], ["bool"]),
    "activation_symmetric": (["true", 0, None], ["bool"]),
    "kv_symmetric": ([1, "no", []], ["bool"]),
    "weight_clip_ratio": ([0.0, -0.5, 1.0001, math.inf, math.nan, "0.9", None, True], ["(0, 1]"]),
    "activation_clip_ratio": ([2, -1, math.nan, [0.9]], ["(0, 1]"]),
    "kv_clip_ratio": ([0, 1.5, -math.inf, "x"], ["(0, 1]"]),
    "weight_group_size": ([1, 0, -128, 64.0, "128", True], ["int"]),
    "rotations": (["R1", ("R1", "R5"), ("R1", "R1"), [1], 5, None], ["R1"]),
    "rotation_search": (["greedy", "", 1, None, ["adaptive"]], ["'adaptive', 'all', 'none'"]),
    "rotation_config": ([[1], "x", 3, {"R1": True}, {"R1": 1, "layers": []},
                         {"R1": True, "layers": [{"R2": True}]}, {"R1": True, "layers": [], "extra": 1},
                         {"R1": True, "layers": "R2"}], []),
    "rotation_seed": ([-1, MAX_SEED, 2**64, 1.5, "0", True, None], ["non-negative int"]),
    "modules_to_not_convert": (["lm_head", [""], [1], 3], ["module name"]),
    "weight_scale_dtype": (["bfloat16", 16, None], ["'float32', 'float16'"]),
    "kv_format": (["fp8", "int4", 8, None], ["'int', 'fp8_e4m3'"]),
    "r4_block_size": ([0, 1, 96, "128", True, 2.0], ["power of two"]),
    "target": ([3, ["vllm-w4a16"], "tensorrt"], ["target name"]),
    "weight_format": (["fp4", 4, None], ["'int', 'nvfp4', 'mxfp4'"]),
    "activation_format": (["nvfp5", 4, ["int"]], ["'int', 'nvfp4', 'mxfp4'"]),
}
LIBRARY_BAD = {
    "format_version": ([0, -1, "1", 1.0, True], ["int"]),
    "checkpoint_format": (["gguf", 1, ""], ["'master', 'packed'"]),
}


def _cases(table):
    return [(f, v, words) for f, (values, words) in table.items() for v in values]


@pytest.mark.parametrize("field,value,words", _cases({**ROSTE_BAD, **LIBRARY_BAD}),
                         ids=[f"{f}={v!r}"[:60] for f, v, _ in _cases({**ROSTE_BAD, **LIBRARY_BAD})])
def test_roste_config_field_errors_name_field_value_and_accepted(field, value, words):
    with pytest.raises((ValueError, TypeError)) as err:
        RoSTEConfig(**{field: value})
    msg = str(err.value)
    assert f"RoSTEConfig.{field}" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    if not isinstance(value, dict) or field != "rotation_config":  # a bad entry of a dict is named instead
        assert repr(value)[:20] in msg or repr(list(value) if isinstance(value, tuple) else value)[:20] in msg, msg
    # the same through from_dict (the path config.json takes)
    with pytest.raises(type(err.value)):
        RoSTEConfig.from_dict({"quant_method": "roste", field: value})


def test_every_roste_field_is_covered():
    assert set(FIELD_HELP) == set(ROSTE_BAD)


def test_seed_bound_is_what_torch_accepts():
    """A seed at the top of the accepted range still seeds R2 of many layers (seed + 1 + layer)."""
    from hf_roste.rotation.fusion import r2_signs

    cfg = RoSTEConfig(rotation_seed=MAX_SEED - 1)
    assert r2_signs(8, cfg.rotation_seed, 1000).abs().eq(1).all()


SFT_BAD = [
    ("rotation_search", "greedy", "None or one of"),
    ("rotation_search", 1, "None or one of"),
    ("rotation_search_criterion", "mse", "'paper', 'output'"),
    ("rotation_search_criterion", None, "'paper', 'output'"),
    ("rotation_calibration_samples", 0, "int >= 1"),
    ("rotation_calibration_samples", 12.0, "int >= 1"),
    ("rotation_calibration_samples", "128", "int >= 1"),
    ("rotation_calibration_samples", True, "int >= 1"),
    ("rotation_search_interval", 0, "int >= 1"),
    ("rotation_search_interval", -5, "int >= 1"),
    ("rotation_search_interval", 2.5, "int >= 1"),
    ("rotation_search_seed", -1, "int >= 0"),
    ("rotation_search_seed", "1", "int >= 0"),
    ("log_quantization_error", "no", "bool"),
    ("log_quantization_error", 1, "bool"),
    ("rotation_calibration_source", "random", "'train_sample', 'first_prompts'"),
    ("rotation_calibration_source", None, "'train_sample', 'first_prompts'"),
    ("rotation_calibration_max_length", 0, "int >= 1"),
    ("rotation_calibration_max_length", 12.5, "int >= 1"),
    ("rotation_calibration_max_length", "512", "int >= 1"),
]


@pytest.mark.parametrize("field,value,accepted", SFT_BAD, ids=[f"{f}={v!r}" for f, v, _ in SFT_BAD])
def test_sft_config_roste_fields(tmp_path, field, value, accepted):
    from hf_roste.training import RoSTESFTConfig

    with pytest.raises(ValueError) as err:
        RoSTESFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **{field: value})
    msg = str(err.value)
    assert f"RoSTESFTConfig.{field}={value!r}" in msg and accepted in msg, msg


def test_every_sft_roste_field_is_covered():
    from trl import SFTConfig

    from hf_roste.training import RoSTESFTConfig

    own = set(RoSTESFTConfig.__dataclass_fields__) - set(SFTConfig.__dataclass_fields__)
    assert own == {f for f, _, _ in SFT_BAD}


# ------------------------------------------------------------------ saved config.json
@pytest.fixture(scope="module")
def saved_packed(tiny_checkpoints, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32,
                                                 quantization_config=RoSTEConfig(rotation_search="all"))
    out = tmp_path_factory.mktemp("cfg") / "packed"
    model.save_pretrained(out)
    return out


def _edit_qc(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_key_in_saved_quantization_config_is_reported(saved_packed, tmp_path):
    import shutil

    d = tmp_path / "u"
    shutil.copytree(saved_packed, d)
    _edit_qc(d, lambda qc: qc.update(weight_bitz=4))
    with pytest.raises(ValueError, match=r"unknown fields \['weight_bitz'\].*accepted fields"):
        AutoModelForCausalLM.from_pretrained(d)


def test_newer_format_version_refused_with_both_versions(saved_packed, tmp_path):
    import shutil

    d = tmp_path / "v"
    shutil.copytree(saved_packed, d)
    _edit_qc(d, lambda qc: qc.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        AutoModelForCausalLM.from_pretrained(d)


# ------------------------------------------------------------------ property-based fuzzing of from_dict
FUZZ_MAX_EXAMPLES = 1000
FUZZ_SECONDS = 12.0
_FIELDS = sorted(FIELD_HELP) + ["format_version", "checkpoint_format", "quant_method"]
_GOOD = RoSTEConfig().to_dict()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from([2, 3, 4, 8, 16, 0.95, "R1", "R2", "adaptive", "all", "none", "packed", "master", "roste"]),
)
garbage = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=4), st.sampled_from(["R1", "R2", "R3", "R4", "layers", "errors"])),
                    inner, max_size=4)), max_leaves=12)
rotation_configs = st.fixed_dictionaries(
    {"R1": st.one_of(st.booleans(), garbage),
     "layers": st.one_of(st.lists(st.fixed_dictionaries({k: st.one_of(st.booleans(), garbage) for k in ("R2", "R3", "R4")}),
                                  max_size=3), garbage)},
    optional={"errors": garbage, "criterion": garbage, "strategy": garbage, "x": garbage})
keys = st.one_of(st.sampled_from(_FIELDS), st.text(max_size=12), st.integers(), st.none())
configs = st.one_of(
    st.dictionaries(keys, garbage, max_size=8),  # random dicts, nested garbage, extra keys
    st.builds(lambda upd: {**_GOOD, **upd},  # right keys, random (often wrong) values
              st.dictionaries(st.sampled_from(_FIELDS), garbage, max_size=3)),
    st.builds(lambda rc, rots: {**_GOOD, "rotation_config": rc, "rotations": rots},
              rotation_configs, st.lists(st.sampled_from(["R1", "R2", "R3", "R4"]), max_size=4, unique=True)),
)

_fuzz_stats = {"tried": 0, "accepted": 0, "ValueError": 0, "TypeError": 0, "skipped_after_time_budget": 0}
_fuzz_start: list[float] = []


@settings(max_examples=FUZZ_MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(configs)
def _fuzz_from_dict(d):
    if not _fuzz_start:
        _fuzz_start.append(time.monotonic())
    if time.monotonic() - _fuzz_start[0] > FUZZ_SECONDS:
        _fuzz_stats["skipped_after_time_budget"] += 1
        return
    _fuzz_stats["tried"] += 1
    try:
        cfg = RoSTEConfig.from_dict(d)
    except (ValueError, TypeError) as exc:
        assert str(exc).strip(), f"empty error message for {d!r}"
        _fuzz_stats[type(exc).__name__ if type(exc) in (ValueError, TypeError) else
                    ("ValueError" if isinstance(exc, ValueError) else "TypeError")] += 1
        return
    _fuzz_stats["accepted"] += 1
    # whatever is accepted round-trips exactly through JSON
    again = RoSTEConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg


def test_fuzz_from_dict_only_clear_errors():
    _fuzz_from_dict()
    assert _fuzz_stats["tried"] >= 200, _fuzz_stats
    record("config_from_dict_fuzz", max_examples=FUZZ_MAX_EXAMPLES, time_budget_s=FUZZ_SECONDS,
           crashes=0, **_fuzz_stats)
