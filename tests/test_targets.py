"""Serving targets (issue 20): the configs, the numerics they add (fp16 scales, fp8 K/V, block-diagonal R4),
and that a target-trained model computes with those numerics in training, packing and generation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_roste import RoSTEConfig, get_state
from hf_roste.numerics import Fp8Spec, QuantSpec, dequantize, fake_quantize, quantization_error, quantize
from hf_roste.numerics.block_hadamard import check_r4_block_size, r4_transform
from hf_roste.numerics.hadamard import hadamard_matrix
from hf_roste.targets import TARGETS, get_target, target_problems


def test_every_target_builds_and_satisfies_its_engine():
    for name, target in TARGETS.items():
        cfg = RoSTEConfig.for_target(name)
        assert cfg.target == name and target_problems(target, cfg) == []
        for field_name, value in target.config.items():
            got = getattr(cfg, field_name)
            assert (tuple(got) if field_name == "rotations" else got) == value, (name, field_name)
        assert RoSTEConfig.from_dict(cfg.to_dict()) == cfg  # travels in config.json


def test_target_fields():
    w8 = RoSTEConfig.for_target("vllm-w8a8")
    assert isinstance(w8.kv_spec, Fp8Spec) and w8.activation_spec == QuantSpec(8, True, 1.0, "token")
    q4 = RoSTEConfig.for_target("llama.cpp-q4_0")
    assert q4.weight_spec == QuantSpec(4, True, 0.95, "group", 32, scale_dtype="float16")
    assert q4.rotations == ("R1", "R2") and q4.activation_bits == q4.kv_bits == 16
    assert RoSTEConfig.for_target("vllm-w4a16-r4").r4_block_size == 128
    assert RoSTEConfig.for_target("paper") == RoSTEConfig(target="paper")


@pytest.mark.parametrize("name, overrides, needle", [
    ("llama.cpp-q4_0", dict(weight_group_size=128), "weight_group_size=128"),
    ("llama.cpp-q4_0", dict(rotations=("R1", "R2", "R4")), "rotations=['R1', 'R2', 'R4']"),
    ("vllm-w4a16", dict(kv_bits=4), "kv_bits=4"),
    ("vllm-w8a8", dict(activation_clip_ratio=0.95), "activation_clip_ratio=0.95"),
    ("vllm-w4a16-r4", dict(r4_block_size=None), "r4_block_size=None"),
])
def test_overrides_the_engine_cannot_run_name_engine_and_setting(name, overrides, needle):
    with pytest.raises(ValueError) as err:
        RoSTEConfig.for_target(name, **overrides)
    assert needle in str(err.value) and get_target(name).engine.split(" ")[0] in str(err.value)


def test_unknown_target_and_bad_fields():
    with pytest.raises(ValueError, match="available targets: paper, vllm-w4a16"):
        RoSTEConfig.for_target("tensorrt")
    with pytest.raises(ValueError, match="kv_format='fp8_e4m3' needs kv_bits=8"):
        RoSTEConfig(kv_format="fp8_e4m3", kv_bits=4)
    with pytest.raises(ValueError, match="power of two"):
        RoSTEConfig(r4_block_size=96)
    with pytest.raises(ValueError, match="weight_scale_dtype"):
        RoSTEConfig(weight_scale_dtype="bfloat16")


def test_fp16_scales_are_fp16_values_and_shared_by_fake_quant_and_codes():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    spec = QuantSpec(4, True, 0.95, "group", 32, scale_dtype="float16")
    codes, scale, zero = quantize(w, spec)
    assert torch.equal(scale.half().float(), scale)
    assert torch.equal(dequantize(codes, scale, zero, spec), fake_quantize(w, spec))
    plain = QuantSpec(4, True, 0.95, "group", 32)
    _, s32, _ = quantize(w, plain)
    assert not torch.equal(s32, scale) and torch.allclose(s32, scale, rtol=2**-10)
    tiny = torch.full((1, 32), 1e-12)  # below fp16's range: the scale never rounds to 0
    assert quantize(tiny, spec)[1].item() == 2.0**-24


def test_fp8_fake_quant_matches_torch_float8_and_is_straight_through():
    x = torch.tensor([[0.0, 1.0, 1.0625, 3.3, -500.0, 1e-3, 447.9, -2.71828]], requires_grad=True)
    spec = Fp8Spec()
    y = fake_quantize(x, spec)
    ref = x.detach().clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(y.detach(), ref) and y[0, 4].item() == -448.0
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert quantization_error(x.detach(), spec).item() == pytest.approx(float(((ref - x.detach()) ** 2).sum()))
    scaled = fake_quantize(torch.tensor([[3.0]]), Fp8Spec(scale=0.5))
    assert scaled.item() == 3.0
    with pytest.raises(ValueError, match="no integer codes"):
        quantize(x.detach(), spec)


def test_block_r4_is_kron_identity_hadamard():
    torch.manual_seed(0)
    x = torch.randn(3, 384, dtype=torch.float64)
    h = hadamard_matrix(128).double()
    dense = torch.block_diag(h, h, h)
    assert torch.allclose(r4_transform(x, 128), x @ dense, atol=1e-12)
    assert torch.allclose(r4_transform(r4_transform(x, 128), 128, transpose=True), x, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        check_r4_block_size(256, 384)


def _tiny(root, **kw):
    cfg = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(root)
    return root


def test_block_r4_model_keeps_the_function_and_packs_exactly(tmp_path):
    base = _tiny(tmp_path / "base")
    ids = sample_ids(2, 12)
    fp = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    cfg = RoSTEConfig.for_target("vllm-w4a16-r4")
    qat = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, attn_implementation="eager").eval()
    down = qat.model.layers[0].mlp.down_proj
    assert down.input_hadamard and down.input_hadamard_block == 128
    from hf_roste import set_quantization_enabled

    with torch.no_grad():
        ref = fp(ids).logits
        set_quantization_enabled(qat, False)
        rotated = qat(ids).logits  # rotations alone keep the full-precision function
        set_quantization_enabled(qat, True)
        trained = qat(ids).logits
    assert torch.allclose(rotated, ref, atol=1e-4)
    qat.save_pretrained(tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", attn_implementation="eager").eval()
    assert get_state(packed).packed
    with torch.no_grad():
        got = packed(ids).logits
    assert torch.allclose(got, trained, atol=1e-4, rtol=1e-4)
    # dequantize() folds the block-diagonal R4 back (not a full-size one): master weights give the fp function,
    # packed weights the packed model's weight function with a plain down_proj
    deq = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, attn_implementation="eager").eval()
    deq.dequantize()
    with torch.no_grad():
        assert torch.allclose(deq(ids).logits, ref, atol=1e-4)
    layer = packed.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    w = layer.dequantized_weight()
    with torch.no_grad():
        expected = r4_transform(x, 128) @ w.T
        packed.dequantize()
        assert torch.allclose(packed.model.layers[0].mlp.down_proj(x), expected, atol=1e-5)


def test_fp8_kv_generation_matches_the_full_forward(tmp_path):
    """fp8 K/V has a static scale: generation with a DynamicCache equals quantizing each token once."""
    base = _tiny(tmp_path / "base")
    cfg = RoSTEConfig.for_target("vllm-w8a8")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, attn_implementation="eager").eval()
    ids = sample_ids(1, 6)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        full = model(gen).logits[0, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(gen[0, ids.shape[1]:], full)
    st = get_state(model).attention_states[0]
    assert isinstance(st.kv_spec, Fp8Spec) and math.isclose(st.kv_spec.scale, 1.0)
