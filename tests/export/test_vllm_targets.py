"""vllm-* targets (issue 20): each export lands in the vLLM scheme branch the target promises, loads through
transformers' compressed-tensors integration and gives the trained function.

The branch table below restates, independently of hf_roste.export.vllm, the conditions read in
vllm-project/vllm `vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py`
(commit be696453ee1bf3b7a2f652cc457b340d5a20c88c, `CompressedTensorsConfig._get_scheme_from_parts` and the
`_is_*` predicates it calls, in that order), the KV validator (`validate_kv_cache_scheme`, version accepting
strategies tensor and attn_head) and `transform/module.py` (commit 055e47c28003156421365af985d676fc921cb075,
`HadamardTransform.forward`: type "hadamard" -> hadacore kernel, else a dense matmul).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_ct_export import _load_plain
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_roste import RoSTEConfig, get_state
from hf_roste.export.compressed_tensors import ExportError, export_compressed_tensors
from hf_roste.export.vllm import kv_cache_accepted, linear_scheme, transform_kernel, vllm_problems

ACT_FORMATS = {"int-quantized", "float-quantized", "naive-quantized"}  # utils.is_activation_quantization_format

# (vLLM scheme class, condition on (weights, input_activations, format)), first match wins, as in vLLM
VLLM_BRANCHES = [
    ("CompressedTensorsWNA16",  # _is_wNa16_group_channel + format pack-quantized + WNA16_SUPPORTED_BITS (4, 8)
     lambda w, a, f: a is None and w["strategy"] in ("channel", "group") and not w["dynamic"]
     and f == "pack-quantized" and w["num_bits"] in (4, 8)),
    ("CompressedTensorsW8A8Int8",  # act format + _is_dynamic_token_w8a8
     lambda w, a, f: f in ACT_FORMATS and a is not None and w["num_bits"] == a["num_bits"] == 8
     and w["strategy"] in ("tensor", "channel") and a["strategy"] == "token" and not w["dynamic"] and a["dynamic"]
     and w["symmetric"]),
    ("CompressedTensorsW4A8Int",  # act format + _is_dynamic_token_w4a8_int
     lambda w, a, f: f in ACT_FORMATS and a is not None and w["num_bits"] == 4 and a["num_bits"] == 8
     and w["strategy"] in ("group", "channel") and a["strategy"] == "token" and not w["dynamic"] and a["dynamic"]
     and w["symmetric"]),
]
EXPECTED = {"vllm-w4a16": "CompressedTensorsWNA16", "vllm-w8a8": "CompressedTensorsW8A8Int8",
            "vllm-w4a16-r4": "CompressedTensorsWNA16"}


def _branch(group: dict, fmt: str) -> str | None:
    w, a, f = group["weights"], group.get("input_activations"), group.get("format") or fmt
    return next((name for name, cond in VLLM_BRANCHES if cond(w, a, f)), None)


def _kv_ok(kv):  # validate_kv_cache_scheme
    return kv is None or (kv["type"] == "float" and kv["num_bits"] == 8 and kv["strategy"] in ("tensor", "attn_head")
                          and kv["symmetric"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module", params=list(EXPECTED))
def exported(request, base, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    qc = RoSTEConfig.for_target(request.param)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.save_pretrained(root / "packed")
    summary = export_compressed_tensors(root / "packed", root / "ct")
    return request.param, root, summary


def test_export_lands_in_the_promised_vllm_branch(exported):
    target, root, summary = exported
    qc = json.loads((root / "ct" / "config.json").read_text())["quantization_config"]
    for group in qc["config_groups"].values():
        assert _branch(group, qc["format"]) == EXPECTED[target]
        assert linear_scheme(group["weights"], group.get("input_activations"), group.get("format") or qc["format"]) \
            == EXPECTED[target]
    assert _kv_ok(qc.get("kv_cache_scheme")) and kv_cache_accepted(qc.get("kv_cache_scheme"))
    assert vllm_problems(qc) == []
    sd = load_file(root / "ct" / "model.safetensors")
    if target == "vllm-w8a8":
        assert qc["format"] == "int-quantized" and sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
        kv = qc["kv_cache_scheme"]
        assert (kv["type"], kv["num_bits"], kv["strategy"], kv["dynamic"]) == ("float", 8, "attn_head", False)
        assert sd["model.layers.1.self_attn.k_scale"].shape == (2, 1, 1)
        assert torch.equal(sd["model.layers.1.self_attn.v_scale"], torch.ones(2, 1, 1))
    else:
        assert qc["format"] == "pack-quantized" and qc.get("kv_cache_scheme") is None
        assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    tc = qc.get("transform_config") or {}
    if target == "vllm-w4a16-r4":
        scheme = tc["config_groups"]["R4"]
        assert transform_kernel(scheme) == "hadacore" and scheme["type"] == "hadamard"
        assert scheme["head_dim"] == 128 and 384 % scheme["head_dim"] == 0
        assert sd["model.layers.0.mlp.down_proj.R4_input.weight"].shape == (128, 128)  # not 384 x 384
        assert summary["r4_block_size"] == 128
    else:
        assert not tc.get("config_groups")


def test_loads_in_transformers_and_gives_the_trained_function(exported, tmp_path):
    """Weights (and the block R4) through plain transformers == the packed hf_roste model; for W8A8 the
    activation / fp8 K/V quantizers are dropped from the copy so that the comparison isolates the weights."""
    target, root, _ = exported
    w8 = target == "vllm-w8a8"
    ids, got, info = _load_plain(root / "ct", tmp_path, drop_act=w8, drop_kv=w8, r4=True)
    assert info["hf_roste_imported"] is False and info["missing"] == []
    packed = AutoModelForCausalLM.from_pretrained(root / "packed", attn_implementation="eager").eval()
    assert get_state(packed).packed
    with torch.no_grad():
        ref = (packed.dequantize() if w8 else packed)(ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-5, rel


def test_w8a8_activation_quantizer_in_transformers_stays_close(base, tmp_path):
    """transformers' compressed-tensors integration quantizes the exported W8A8 activations with its reference rule
    (amax/127.5; vLLM's kernel uses amax/127, the trained rule) and, measured here, ignores the fp8 `attn_head`
    kv_cache_scheme (dropping it changes nothing). Against the packed model with its own K/V quantization off,
    the difference is int8 rounding noise (measured 1.4% of the logit range on this random model)."""
    qc = RoSTEConfig.for_target("vllm-w8a8")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path / "packed")
    export_compressed_tensors(tmp_path / "packed", tmp_path / "ct")
    ids, got, _ = _load_plain(tmp_path / "ct", tmp_path, drop_act=False, drop_kv=False, r4=False)
    _, got_no_kv, _ = _load_plain(tmp_path / "ct", tmp_path, drop_act=False, drop_kv=True, r4=False)
    assert torch.equal(got, got_no_kv)  # the kv_cache_scheme is not applied by transformers (see docstring)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", attn_implementation="eager").eval()
    for st in get_state(packed).attention_states:
        st.quant_enabled = False
    with torch.no_grad():
        ref = packed(ids).logits
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 2e-2, rel


def test_paper_config_is_refused_for_vllm():
    qc = {"format": "pack-quantized",
          "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                    "strategy": "channel", "dynamic": False},
                                        "input_activations": {"num_bits": 4, "type": "int", "symmetric": True,
                                                              "strategy": "token", "dynamic": True}}},
          "kv_cache_scheme": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}}
    problems = vllm_problems(qc)
    assert _branch(qc["config_groups"]["group_0"], qc["format"]) is None
    assert len(problems) == 2 and "No compressed-tensors compatible scheme" in problems[0]
    assert "8-bit float K/V" in problems[1]


def test_target_overrides_the_engine_cannot_run_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="vLLM .* cannot run it"):
        RoSTEConfig.for_target("vllm-w8a8", activation_clip_ratio=0.95)
    cfg = RoSTEConfig.for_target("vllm-w4a16")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg).eval()
    model.config.quantization_config.kv_bits = 4  # edited after training: the export re-checks the target
    with pytest.raises(ExportError, match="kv_bits=4"):
        export_compressed_tensors(model, tmp_path / "x")
