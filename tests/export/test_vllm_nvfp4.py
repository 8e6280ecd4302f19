"""The `vllm-nvfp4` serving target (issue 21): config, CLI export with calibration, the vLLM branch it lands in,
the block R4 and fp8 K/V it writes, and the plain-transformers reload.

The FP4 branch table below restates, independently of `hf_roste.export.vllm`, the conditions read in vLLM's
`compressed_tensors.py` (`_get_scheme_from_parts` with `_is_nvfp4_format` / `_is_mxfp4`, in that order) and
`transform/schemes/linear_qutlass_nvfp4.py` (commit 055e47c28003156421365af985d676fc921cb075,
`is_qutlass_fp4_scheme`: CompressedTensorsW4A4Fp4 with input transforms whose `head_dim` is 16, 32, 64 or 128).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_ct_fp4_export import _load_plain
from tiny_data import char_tokenizer, text_dataset, write_jsonl
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.cli import main
from hf_roste.export.vllm import kv_cache_accepted, linear_scheme, vllm_problems


def _nv(a):  # _is_nvfp4_format
    return a is not None and a["type"] == "float" and a["num_bits"] == 4 and a["strategy"] == "tensor_group" \
        and a["group_size"] == 16 and a["symmetric"]


def _mx(a):  # _is_mxfp4
    return a is not None and a["type"] == "float" and a["num_bits"] == 4 and a["strategy"] == "group" \
        and a["group_size"] == 32 and a["symmetric"]


ACT_FORMATS = {"int-quantized", "float-quantized", "naive-quantized", "nvfp4-pack-quantized"}
FP4_BRANCHES = [
    ("CompressedTensorsW4A16Fp4", lambda w, a, f: _nv(w) and a is None),
    ("CompressedTensorsW4A16Mxfp4", lambda w, a, f: _mx(w)),
    ("CompressedTensorsW4A4Fp4", lambda w, a, f: f in ACT_FORMATS and _nv(w) and _nv(a)),
]


def _branch(group: dict, fmt: str) -> str | None:
    w, a, f = group["weights"], group.get("input_activations"), group.get("format") or fmt
    return next((name for name, cond in FP4_BRANCHES if cond(w, a, f)), None)


def test_target_config_and_refused_overrides():
    c = RoSTEConfig.for_target("vllm-nvfp4")
    assert (c.weight_format, c.activation_format, c.weight_bits, c.activation_bits) == ("nvfp4", "nvfp4", 4, 4)
    assert (c.kv_bits, c.kv_format, c.r4_block_size, c.target) == (8, "fp8_e4m3", 16, "vllm-nvfp4")
    assert c.rotations == ("R1", "R2", "R4") and c.scheme_name == "nvfp4-w4a4kvfp8"
    assert RoSTEConfig.for_target("vllm-nvfp4", r4_block_size=128, kv_bits=16, kv_format="int").kv_bits == 16
    for bad, field in ((dict(weight_format="mxfp4", activation_format="mxfp4"), "weight_format"),
                       (dict(r4_block_size=256), "r4_block_size"), (dict(rotations=("R1", "R2", "R3", "R4")), "rotations"),
                       (dict(kv_bits=4, kv_format="int"), "kv_bits")):
        with pytest.raises(ValueError, match=f"{field}=.*cannot run it"):
            RoSTEConfig.for_target("vllm-nvfp4", **bad)


def test_fp4_branch_rules_match_the_restated_table():
    nv = {"type": "float", "num_bits": 4, "strategy": "tensor_group", "group_size": 16, "symmetric": True,
          "dynamic": False}
    nv_act = {**nv, "dynamic": "local"}
    mx = {"type": "float", "num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": True, "dynamic": False}
    cases = [(nv, None, "nvfp4-pack-quantized"), (nv, nv_act, "nvfp4-pack-quantized"), (nv, nv_act, "pack-quantized"),
             (mx, None, "mxfp4-pack-quantized"), (mx, {**mx, "dynamic": True}, "mxfp4-pack-quantized"),
             ({**nv, "group_size": 32}, nv_act, "nvfp4-pack-quantized"), ({**nv, "symmetric": False}, None, "x")]
    got = [linear_scheme(w, a, f) for w, a, f in cases]
    assert got == [_branch({"weights": w, "input_activations": a}, f) for w, a, f in cases]
    assert got == ["CompressedTensorsW4A16Fp4", "CompressedTensorsW4A4Fp4", None, "CompressedTensorsW4A16Mxfp4",
                   "CompressedTensorsW4A16Mxfp4", None, None]


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_nvfp4")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32,
                                                 quantization_config=RoSTEConfig.for_target("vllm-nvfp4"),
                                                 attn_implementation="eager").eval()
    model.save_pretrained(root / "packed")
    char_tokenizer().save_pretrained(root / "packed")
    data = write_jsonl(root / "calib.jsonl", [{"text": t} for t in text_dataset(24)["text"]])
    assert main(["export", str(root / "packed"), str(root / "ct"), "--dataset", data, "--samples", "16",
                 "--batch-size", "4"]) == 0
    assert main(["export", str(root / "packed"), str(root / "ct_a16"), "--weights-only"]) == 0
    return root


def test_cli_export_lands_in_w4a4fp4_with_block_r4_and_fp8_kv(exported):
    qc = json.loads((exported / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "nvfp4-pack-quantized"
    assert _branch(group, qc["format"]) == "CompressedTensorsW4A4Fp4"
    assert linear_scheme(group["weights"], group["input_activations"], qc["format"]) == "CompressedTensorsW4A4Fp4"
    kv = qc["kv_cache_scheme"]
    assert (kv["type"], kv["num_bits"], kv["strategy"], kv["symmetric"], kv["dynamic"]) == \
        ("float", 8, "attn_head", True, False)
    assert kv_cache_accepted(kv) and vllm_problems(qc) == []
    r4 = qc["transform_config"]["config_groups"]["R4"]
    assert r4["type"] == "hadamard" and r4["head_dim"] in (16, 32, 64, 128)  # QuTLASS's fused sizes
    sd = load_file(exported / "ct" / "model.safetensors")
    assert sd["model.layers.0.mlp.down_proj.R4_input.weight"].shape == (16, 16)
    assert sd["model.layers.1.self_attn.k_scale"].shape == (2, 1, 1)
    scales = [v for k, v in sd.items() if k.endswith("input_global_scale")]
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() for s in scales)
    summary = json.loads((exported / "ct" / "roste_export.json").read_text())
    assert summary["target"] == "vllm-nvfp4" and set(summary["vllm_scheme"]) == {"CompressedTensorsW4A4Fp4"}
    assert summary["r4_block_size"] == 16 and summary["calibrated_input_global_scales"] == len(scales)
    card = (exported / "ct" / "README.md").read_text()
    assert "vllm serve ct --kv-cache-dtype fp8" in card and "NVFP4 (e2m1)" in card and "fp8 e4m3" in card


def test_weights_only_export_lands_in_w4a16fp4(exported):
    qc = json.loads((exported / "ct_a16" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert group["input_activations"] is None
    assert _branch(group, qc["format"]) == linear_scheme(group["weights"], None, qc["format"]) \
        == "CompressedTensorsW4A16Fp4"
    assert not any(k.endswith("input_global_scale") for k in load_file(exported / "ct_a16" / "model.safetensors"))
    assert "weight-only export" in (exported / "ct_a16" / "README.md").read_text()


def test_plain_transformers_reload_with_block_r4_gives_the_trained_weights_function(exported, tmp_path):
    """Plain transformers + compressed-tensors' transform (block-16 Hadamard on every down_proj input), activations
    and K/V left unquantized, equals the packed model's dequantized weights (bf16 rounding)."""
    ids, got, info = _load_plain(exported / "ct", tmp_path, drop_act=True)
    assert info["hf_roste_imported"] is False and info["missing"] == []
    packed = AutoModelForCausalLM.from_pretrained(exported / "packed", attn_implementation="eager").eval()
    plain = packed.dequantize()
    with torch.no_grad():
        ref = plain.to(torch.bfloat16)(ids).logits.float()
    rel = ((got["logits"].float() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 2e-2, rel
    assert ids.shape == sample_ids(2, 16).shape


def test_cli_refuses_what_does_not_apply(exported, tiny_checkpoints, tmp_path, capsys):
    assert main(["export", str(exported / "packed"), str(tmp_path / "x"), "--weights-only", "--dataset",
                 str(exported / "calib.jsonl")]) != 0
    assert "pass one of them" in capsys.readouterr().err
    assert main(["export", str(exported / "packed"), str(tmp_path / "y")]) != 0
    assert "--dataset" in capsys.readouterr().err  # NVFP4 activations without calibration
    int_cfg = RoSTEConfig.for_target("vllm-w4a16", weight_group_size=32)
    int_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=int_cfg)
    int_model.save_pretrained(tmp_path / "int")
    assert main(["export", str(tmp_path / "int"), str(tmp_path / "z"), "--weights-only"]) != 0
    assert "FP4 models" in capsys.readouterr().err
