"""RoSTE with FP4 (NVFP4 / MXFP4) weights and activations: config, QAT forward, training, search,
packed checkpoint and dequantize."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_qat_model import MIXED, reference_llama_forward
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state, search_rotation_config, set_quantization_enabled
from hf_roste.modules.packed_fp4_linear import PackedFP4Linear
from hf_roste.modules.qat_linear import QATLinear
from hf_roste.numerics import fake_quantize
from hf_roste.numerics.fp4 import FP4Spec

EAGER = dict(attn_implementation="eager")


def fp4(fmt: str, **kw) -> dict:
    return dict(weight_format=fmt, activation_format=fmt, weight_bits=4, activation_bits=4, **kw)


def _load(path, **cfg):
    cfg.setdefault("kv_bits", 4)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32,
                                                **EAGER).eval()


# --------------------------------------------------------------------------- config
def test_config_fields_specs_and_round_trip():
    cfg = RoSTEConfig(**fp4("nvfp4"), kv_bits=8)
    assert cfg.weight_spec == FP4Spec("nvfp4", "tensor") and cfg.activation_spec == FP4Spec("nvfp4", "row")
    assert cfg.kv_spec.bits == 8 and cfg.scheme_name == "nvfp4-w4a4kv8"
    again = RoSTEConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.weight_format == "nvfp4"
    mixed = RoSTEConfig(weight_format="mxfp4", activation_bits=8)
    assert mixed.activation_spec.bits == 8 and mixed.scheme_name == "mxfp4-int-w4a8kv4"
    assert RoSTEConfig(weight_format="mxfp4", weight_group_size=32).weight_spec.block_size == 32
    assert RoSTEConfig().weight_format == "int" and RoSTEConfig.from_dict({"weight_bits": 4}).activation_format == "int"
    from hf_roste.export.model_card import quant_rows

    rows = quant_rows(cfg)
    assert "NVFP4" in rows[0]["granularity"] and "per token" in rows[1]["granularity"]
    assert rows[2]["granularity"] == "per token per head (dynamic)"


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_format="nvfp4", weight_bits=8), "weight_bits=4"),
    (dict(activation_format="mxfp4", activation_bits=16), "activation_bits=4"),
    (dict(weight_format="fp4"), "one of"),
    (dict(weight_format="nvfp4", weight_group_size=32), "blocks are 16"),
    (dict(weight_format="mxfp4", weight_clip_ratio=0.9), "no effect"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoSTEConfig(**kwargs)


def test_block_size_must_divide_every_linear(tiny_checkpoints):
    with pytest.raises(ValueError, match="blocks of 32"):  # qwen2 tiny: hidden 112 is not a multiple of 32
        _load(tiny_checkpoints["qwen2"], **fp4("mxfp4"))


# --------------------------------------------------------------------------- QAT forward
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_qat_forward_matches_independent_reference(tiny_checkpoints, fmt):
    model = _load(tiny_checkpoints["llama"], rotation_config={"R1": True, "layers": MIXED}, **fp4(fmt))
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QATLinear) and lin.weight_spec.format == fmt and fmt in repr(lin)
    cfg = model.config.quantization_config
    ids = sample_ids()
    with torch.no_grad():
        out = model(ids).logits
        ref = reference_llama_forward(model, ids, cfg.weight_spec, cfg.activation_spec, cfg.kv_spec, MIXED)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    set_quantization_enabled(model, False)
    with torch.no_grad():
        fp = model(ids).logits
    assert (fp - out).abs().max() > 1e-2 * fp.abs().max()  # FP4 really changes the function


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "mistral"])
def test_rotations_on_quantization_off_is_the_original_model(tiny_checkpoints, kind):
    path = tiny_checkpoints[kind]
    ids = sample_ids()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **EAGER).eval()
    model = _load(path, rotation_search="all", **fp4("nvfp4"))
    set_quantization_enabled(model, False)
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-4


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_qat_trains_and_gradients_reach_every_weight(tiny_checkpoints, fmt):
    torch.manual_seed(0)
    model = _load(tiny_checkpoints["llama"], rotation_search="all", **fp4(fmt)).train()
    ids = sample_ids(batch=4, seq=24, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and not (p.grad is not None
                                                                                        and p.grad.abs().sum() > 0)]
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_adaptive_search_runs_on_fp4_errors(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"], rotation_search="adaptive", **fp4("mxfp4"))
    batches = [{"input_ids": sample_ids(batch=2, seq=16, seed=s), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for s in range(3)]
    set_quantization_enabled(model, False)
    with torch.no_grad():
        before = model(batches[0]["input_ids"]).logits
    set_quantization_enabled(model, True)
    result = search_rotation_config(model, batches)
    errors = model.config.quantization_config.rotation_config["errors"]
    assert len(errors) == 2 and all(v > 0 for e in errors for pair in e.values() for v in pair)
    assert result.layers == model.config.quantization_config.rotation_config["layers"]
    set_quantization_enabled(model, False)
    with torch.no_grad():
        after = model(batches[0]["input_ids"]).logits
    assert float((before - after).abs().max() / before.abs().max()) <= 1e-4


# --------------------------------------------------------------------------- packed checkpoint
@pytest.fixture(scope="module", params=["nvfp4", "mxfp4"])
def trained_fp4(request, tmp_path_factory, tiny_checkpoints):
    """A tiny Llama QA-trained a few steps in FP4, and its packed save."""
    fmt = request.param
    torch.manual_seed(0)
    model = _load(tiny_checkpoints["llama"], rotation_config={"R1": True, "layers": MIXED}, **fp4(fmt)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(6):
        ids = (torch.randint(0, 100, (4, 1), generator=torch.Generator().manual_seed(step)) + torch.arange(16)) % 128
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp(f"packed_{fmt}") / "ckpt"
    model.save_pretrained(out)
    return fmt, model, out


def test_packed_fp4_layout(trained_fp4):
    fmt, model, out = trained_fp4
    sd = load_file(out / "model.safetensors")
    pre = "model.layers.0.self_attn.q_proj."
    assert sd[pre + "weight_packed"].dtype == torch.uint8 and sd[pre + "weight_packed"].shape == (64, 32)
    block = 16 if fmt == "nvfp4" else 32
    assert sd[pre + "weight_scale"].shape == (64, 64 // block)
    assert sd[pre + "weight_scale"].dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    assert (pre + "weight_global_scale" in sd) == (fmt == "nvfp4")
    assert pre + "weight_zero_point" not in sd


def test_packed_fp4_reload_reproduces_trained_function(trained_fp4):
    fmt, model, out = trained_fp4
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **EAGER)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    reloaded.eval()
    state = get_state(reloaded)
    assert state.packed and all(isinstance(reloaded.get_submodule(p), PackedFP4Linear)
                                for p in state.adapter.quantized_linear_paths(reloaded))
    ids = sample_ids(batch=3, seq=20, seed=4)
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    assert torch.equal(a, b)
    top_a, top_b = a.topk(2, dim=-1), b.topk(2, dim=-1)
    ties = int((top_a.values[..., 0] == top_a.values[..., 1]).sum())
    assert torch.equal(top_a.indices[..., 0], top_b.indices[..., 0]), f"{ties} tied positions"
    q = model.model.layers[1].mlp.down_proj
    w = reloaded.model.layers[1].mlp.down_proj.dequantized_weight()
    assert torch.equal(w, fake_quantize(q.weight.detach(), q.weight_spec))
    gen_a = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    gen_b = reloaded.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen_a, gen_b)


def test_packed_fp4_bf16_load_keeps_scales(trained_fp4):
    fmt, _, out = trained_fp4
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, **EAGER)
    lin = model.model.layers[0].self_attn.k_proj
    assert lin.weight_scale.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    with torch.no_grad():
        assert torch.isfinite(model(sample_ids()).logits.float()).all()


def test_dequantize_packed_fp4(trained_fp4):
    _, _, out = trained_fp4
    packed = AutoModelForCausalLM.from_pretrained(out, **EAGER)
    w_q = packed.model.layers[0].self_attn.q_proj.dequantized_weight()
    plain = packed.dequantize()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, w_q)
    with torch.no_grad():
        assert torch.isfinite(plain(sample_ids()).logits).all()
