"""compressed-tensors NVFP4 / MXFP4 export: config, tensors, plain-transformers reload, refusals."""

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

from hf_roste import RoSTEConfig
from hf_roste.export.compressed_tensors import ExportError, exact_dynamic_clip_ratio
from hf_roste.export.compressed_tensors_fp4 import check_exportable_fp4, export_compressed_tensors_fp4

SCRIPT = Path(__file__).with_name("ct_fp4_load_script.py")
C4 = exact_dynamic_clip_ratio(4)


def _cfg(fmt: str, **kw) -> RoSTEConfig:
    base = dict(weight_format=fmt, activation_format=fmt, kv_bits=4, kv_symmetric=True, kv_clip_ratio=C4,
                rotations=("R1", "R2", "R4"), rotation_search="all")
    return RoSTEConfig(**{**base, **kw})


def _qat(path, cfg):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=["nvfp4", "mxfp4"])
def exported(request, tiny_checkpoints, tmp_path_factory):
    fmt = request.param
    root = tmp_path_factory.mktemp(f"ct_{fmt}")
    model = _qat(tiny_checkpoints["llama"], _cfg(fmt))
    calib = [sample_ids(2, 16, seed=s) for s in range(2)]
    model.save_pretrained(root / "packed")
    export_compressed_tensors_fp4(root / "packed", root / "ct", calibration=calib)
    export_compressed_tensors_fp4(model, root / "ct_from_qat", calibration=calib)
    return fmt, root


def test_config_and_tensors(exported):
    fmt, root = exported
    qc = json.loads((root / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == f"{fmt}-pack-quantized" and qc["ignore"] == ["lm_head"]
    w, a = group["weights"], group["input_activations"]
    assert w["type"] == a["type"] == "float" and w["num_bits"] == a["num_bits"] == 4
    assert w["group_size"] == a["group_size"] == (16 if fmt == "nvfp4" else 32)
    assert w["strategy"] == ("tensor_group" if fmt == "nvfp4" else "group")
    assert a["dynamic"] == ("local" if fmt == "nvfp4" else True)
    assert qc["kv_cache_scheme"]["num_bits"] == 4
    sd = load_file(root / "ct" / "model.safetensors")
    pre = "model.layers.0.mlp.down_proj."
    assert sd[pre + "weight_packed"].dtype == torch.uint8 and sd[pre + "weight_packed"].shape == (64, 64)
    assert sd[pre + "weight_scale"].dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    assert (pre + "weight_global_scale" in sd) == (pre + "input_global_scale" in sd) == (fmt == "nvfp4")
    packed = load_file(root / "packed" / "model.safetensors")
    for leaf in ("weight_packed", "weight_scale"):  # hf_roste's packed tensors, unchanged
        assert torch.equal(sd[pre + leaf].view(torch.uint8), packed[pre + leaf].view(torch.uint8))
    other = load_file(root / "ct_from_qat" / "model.safetensors")
    assert sd.keys() == other.keys() and all(torch.equal(sd[k].view(torch.uint8) if sd[k].dtype.itemsize == 1
                                                         else sd[k], other[k].view(torch.uint8)
                                                         if other[k].dtype.itemsize == 1 else other[k]) for k in sd)


def _load_plain(export_dir: Path, tmp: Path, drop_act: bool):
    ids = sample_ids(2, 16)
    torch.save(ids, tmp / "ids.pt")
    out = subprocess.run([sys.executable, str(SCRIPT), str(export_dir), str(tmp / "ids.pt"), str(tmp / "out.pt"),
                          "1" if drop_act else "0", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return ids, torch.load(tmp / "out.pt"), json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_transformers_reload_gives_the_same_weights_and_function(exported, tmp_path):
    fmt, root = exported
    ids, got, info = _load_plain(root / "ct", tmp_path, drop_act=True)
    assert info["hf_roste_imported"] is False and info["missing"] == []
    packed = AutoModelForCausalLM.from_pretrained(root / "packed", attn_implementation="eager").eval()
    plain = packed.dequantize()  # hf_roste's dequantized weights (R4 folded back into down_proj)
    ref_packed = AutoModelForCausalLM.from_pretrained(root / "packed", attn_implementation="eager").eval()
    for name, w in got["weights"].items():
        ours = ref_packed.get_submodule(name).dequantized_weight()
        # compressed-tensors decompresses to bfloat16: equal to ours rounded to bfloat16 (MXFP4 exactly)
        if fmt == "mxfp4":
            assert torch.equal(w, ours.to(torch.bfloat16)), name
        else:
            assert torch.allclose(w.float(), ours, rtol=2**-7, atol=0), name
    with torch.no_grad():
        ref = plain.to(torch.bfloat16)(ids).logits.float()
    rel = ((got["logits"].float() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 2e-2, rel
    # with the activation scheme kept, transformers fake-quantizes the inputs: the function changes
    _, with_act, info = _load_plain(root / "ct", tmp_path, drop_act=False)
    assert not any(k.endswith("input_global_scale") for k in info["unexpected"])
    assert not torch.equal(with_act["logits"], got["logits"])


def test_refusals_and_weight_only(tiny_checkpoints, tmp_path):
    model = _qat(tiny_checkpoints["llama"], _cfg("nvfp4"))
    with pytest.raises(ExportError, match="calibration="):
        export_compressed_tensors_fp4(model, tmp_path / "a")
    summary = export_compressed_tensors_fp4(model, tmp_path / "b", activations=False)
    assert summary["activations"] is None
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    assert any("weight_format='int'" in p for p in check_exportable_fp4(RoSTEConfig()))
    from hf_roste.export.compressed_tensors import check_exportable

    assert any("export_compressed_tensors_fp4" in p for p in check_exportable(_cfg("nvfp4")))
    assert any("rotations=('R1', 'R2', 'R4')" in p
               for p in check_exportable_fp4(_cfg("mxfp4", rotations=("R1", "R2", "R3", "R4"))))
    assert any("kv_symmetric=True" in p for p in check_exportable_fp4(_cfg("mxfp4", kv_symmetric=False)))
    assert any("one format for both" in p
               for p in check_exportable_fp4(RoSTEConfig(weight_format="nvfp4", activation_format="mxfp4")))
