"""compressed-tensors export (issue 7): config contents, bit-exact weights, plain-transformers round trip, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state
from hf_roste.cli import main as cli_main
from hf_roste.export.compressed_tensors import (
    ExportError,
    _compress_linear,
    check_exportable,
    exact_dynamic_clip_ratio,
    export_compressed_tensors,
)

SCRIPT = Path(__file__).with_name("ct_load_script.py")
C4 = exact_dynamic_clip_ratio(4)
EXPORTABLE = dict(activation_symmetric=True, weight_symmetric=True, kv_symmetric=True, rotations=("R1", "R2", "R4"),
                  rotation_search="all", activation_clip_ratio=C4, kv_clip_ratio=C4)
MIXED_R4_GROUP = dict(EXPORTABLE, weight_group_size=32, rotation_search="adaptive",
                     rotation_config={"R1": True, "layers": [{"R2": False, "R3": False, "R4": False},
                                                             {"R2": True, "R3": False, "R4": True}]})


def _qat(path, **cfg):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=["all_r4_channel", "mixed_r4_group"])
def exported(request, tiny_checkpoints, tmp_path_factory):
    cfg = EXPORTABLE if request.param == "all_r4_channel" else MIXED_R4_GROUP
    root = tmp_path_factory.mktemp(request.param)
    model = _qat(tiny_checkpoints["llama"], **cfg)
    model.save_pretrained(root / "packed")
    assert cli_main(["export", str(root / "packed"), str(root / "ct"), "--format", "compressed-tensors"]) == 0
    export_compressed_tensors(model, root / "ct_from_qat")  # the QAT model itself (codes built from master weights)
    return request.param, root


def _load_plain(export_dir: Path, tmp: Path, drop_act: bool, drop_kv: bool, r4: bool):
    ids = sample_ids(2, 16)
    torch.save(ids, tmp / "ids.pt")
    out = subprocess.run([sys.executable, str(SCRIPT), str(export_dir), str(tmp / "ids.pt"), str(tmp / "out.pt"),
                          *("1" if f else "0" for f in (drop_act, drop_kv, r4))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return ids, torch.load(tmp / "out.pt"), json.loads(out.stdout.strip().splitlines()[-1])


def test_config_and_tensors(exported):
    kind, root = exported
    cfg = json.loads((root / "ct" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert cfg["tie_word_embeddings"] is False and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["weights"]["num_bits"] == 4
    assert group["input_activations"] == {**group["input_activations"], "num_bits": 4, "symmetric": True,
                                          "strategy": "token", "dynamic": True}
    assert qc["kv_cache_scheme"]["num_bits"] == 4 and qc["kv_cache_scheme"]["dynamic"] is True
    apply = qc["transform_config"]["config_groups"]["R4"]["apply"]
    assert [(a["location"], a["inverse"]) for a in apply] == [("input", False), ("weight_input", True)]
    sd = load_file(root / "ct" / "model.safetensors")
    assert sd["model.layers.1.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert sd["model.layers.1.mlp.down_proj.weight_packed"].shape == (64, 128 // 8)
    assert sd["model.layers.1.mlp.down_proj.R4_input.weight"].shape == (128, 128)
    if kind == "all_r4_channel":
        assert apply[0]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
        assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    else:
        assert apply[0]["targets"] == ["model.layers.1.mlp.down_proj"]  # per-layer mixed R4, by module name
        assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
        assert "model.layers.0.mlp.down_proj.weight_zero_point" not in sd
        assert "model.layers.0.mlp.down_proj.R4_input.weight" not in sd
    # exporting the packed folder or the QAT model gives the same tensors
    other = load_file(root / "ct_from_qat" / "model.safetensors")
    assert sd.keys() == other.keys() and all(torch.equal(sd[k], other[k]) for k in sd)


def test_plain_transformers_round_trip_is_exact(exported, tmp_path):
    """Weights + online R4 through transformers' compressed-tensors loader == hf_roste's packed weights.

    transformers 5.23 fake-quantizes input activations and K/V from the exported schemes but does not apply
    `transform_config`; here activation/K-V quantization are removed from the copy's config and R4 is applied
    with compressed-tensors' apply_transform_config, so the comparison isolates weights + R4: the reference is
    the hf_roste packed model dequantized (integer codes -> float, R4 folded back, no activation/K-V quantization).
    """
    kind, root = exported
    ids, got, info = _load_plain(root / "ct", tmp_path, drop_act=True, drop_kv=True, r4=True)
    assert info["hf_roste_imported"] is False and info["missing"] == []
    assert all(k.endswith("R4_input.weight") for k in info["unexpected"])
    packed = AutoModelForCausalLM.from_pretrained(root / "packed", attn_implementation="eager").eval()
    assert get_state(packed).packed
    with torch.no_grad():
        ref = packed.dequantize()(ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel
    if kind == "all_r4_channel":  # without the online transform the model is wrong: R4's inverse is fused in down_proj
        _, no_r4, _ = _load_plain(root / "ct", tmp_path, drop_act=True, drop_kv=True, r4=False)
        assert ((no_r4 - ref).abs().max() / ref.abs().max()).item() > 1e-2


@pytest.mark.parametrize("overrides, needle", [
    (dict(activation_symmetric=False), "activation_symmetric=True"),
    (dict(kv_symmetric=False), "kv_symmetric=True"),
    (dict(weight_bits=3), "weight_bits=4"),
    (dict(weight_symmetric=False), "weight_symmetric=True"),
    (dict(rotations=("R1", "R2", "R3", "R4")), "rotations=('R1', 'R2', 'R4')"),
    (dict(activation_clip_ratio=0.95), f"activation_clip_ratio={C4!r}"),
    (dict(kv_clip_ratio=0.95), f"kv_clip_ratio={C4!r}"),
])
def test_refusals_name_the_option(overrides, needle):
    problems = check_exportable(RoSTEConfig(**{**EXPORTABLE, **overrides}))
    assert len(problems) == 1 and needle in problems[0], problems


def test_exportable_config_and_clip_override():
    assert check_exportable(RoSTEConfig(**EXPORTABLE)) == []
    assert check_exportable(RoSTEConfig(**{**EXPORTABLE, "activation_clip_ratio": 0.95}), strict=False) == []
    assert check_exportable(RoSTEConfig(**{**EXPORTABLE, "kv_bits": 16, "rotations": ("R1", "R2", "R3", "R4")})) == []


def test_cli_refuses_with_exit_code(tiny_checkpoints, tmp_path, capsys):
    _qat(tiny_checkpoints["llama"], rotation_search="all").save_pretrained(tmp_path / "paper")  # paper defaults
    assert cli_main(["export", str(tmp_path / "paper"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "activation_symmetric=True" in err and "kv_symmetric=True" in err and "rotations=" in err
    assert not (tmp_path / "out").exists()


def test_layernorm_family_is_refused(tiny_checkpoints, tmp_path):
    model = _qat(tiny_checkpoints["gpt_neox"], **EXPORTABLE)
    with pytest.raises(ExportError, match="model_type 'gpt_neox'"):
        export_compressed_tensors(model, tmp_path / "out")


def test_asymmetric_zero_point_out_of_range_is_refused():
    cfg = RoSTEConfig(**{**EXPORTABLE, "weight_symmetric": False})
    from compressed_tensors.quantization import QuantizationScheme

    from hf_roste.export.compressed_tensors import _weight_args

    t = {"codes": torch.zeros(2, 8, dtype=torch.uint8), "scale": torch.ones(2, 1), "zero": torch.tensor([[3.0], [-2.0]]),
         "bias": None}
    with pytest.raises(ExportError, match="weight_symmetric=True"):
        _compress_linear("layer.x", t, cfg, QuantizationScheme(targets=["Linear"], weights=_weight_args(cfg)))


def test_asymmetric_weights_with_strict_false_store_packed_zero_points(tiny_checkpoints, tmp_path):
    model = _qat(tiny_checkpoints["llama"], **{**EXPORTABLE, "weight_symmetric": False})
    with pytest.raises(ExportError, match="weight_symmetric=True"):
        export_compressed_tensors(model, tmp_path / "strict")
    export_compressed_tensors(model, tmp_path / "out", strict=False)
    sd = load_file(tmp_path / "out" / "model.safetensors")
    zp = sd["model.layers.0.mlp.down_proj.weight_zero_point"]
    assert zp.dtype == torch.int32 and zp.shape == (64 // 8, 1)  # 4-bit zero points packed along the output dim


@pytest.mark.parametrize("kind", ["mistral", "llama_npow2_tied"])
def test_non_power_of_two_r4_round_trips_through_the_compressed_tensors_loader(tiny_checkpoints, tmp_path, kind):
    """R4 sizes 192 / 160: compressed-tensors regenerates a row-signed 'random-hadamard' matrix; the export
    stores that matrix and negates the matching up_proj rows, so the plain-transformers model is the trained one."""
    model = _qat(tiny_checkpoints[kind], **EXPORTABLE)
    model.save_pretrained(tmp_path / "packed")
    summary = export_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["transform_config"]["config_groups"]["R4"]["type"] == "random-hadamard"
    assert any("random-hadamard" in n for n in summary.get("notes", [])), summary
    ids, got, info = _load_plain(tmp_path / "ct", tmp_path, drop_act=True, drop_kv=True, r4=True)
    assert info["missing"] == []
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = packed.dequantize()(ids).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
