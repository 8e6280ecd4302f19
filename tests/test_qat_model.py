"""The QAT model with quantization on: reference forward, training, generation, master save/reload."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CACHE_KW, output_cache, sample_ids
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state, save_format, set_quantization_enabled, set_rotation_config
from hf_roste.numerics import QuantSpec, fake_quantize
from hf_roste.numerics.hadamard import hadamard_transform

W4A4KV4 = dict(weight_bits=4, activation_bits=4, kv_bits=4)
MIXED = [{"R2": True, "R3": True, "R4": False}, {"R2": False, "R3": False, "R4": True}]


def _load(path, **cfg):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32, attn_implementation="eager"
    )


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rms(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def reference_llama_forward(model, ids, wspec: QuantSpec, aspec: QuantSpec, kvspec: QuantSpec, flags):
    """Llama forward written out from the method's definition, with the numerics module's quantizer."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    fa = lambda t: fake_quantize(t, aspec)  # noqa: E731
    fw = lambda lin: fake_quantize(lin.weight, wspec)  # noqa: E731
    b, s = ids.shape
    h = model.model.embed_tokens.weight[ids]
    pos = torch.arange(s)[None]
    cos, sin = model.model.rotary_emb(h, pos)
    cos, sin = cos[:, None], sin[:, None]
    causal = torch.full((s, s), float("-inf")).triu(1)
    for layer, f in zip(model.model.layers, flags, strict=True):
        at = layer.self_attn
        x = fa(_rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps))
        q = F.linear(x, fw(at.q_proj)).view(b, s, heads, hd).transpose(1, 2)
        k = F.linear(x, fw(at.k_proj)).view(b, s, kv_heads, hd).transpose(1, 2)
        v = F.linear(x, fw(at.v_proj)).view(b, s, kv_heads, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if f["R3"]:
            q, k = hadamard_transform(q), hadamard_transform(k)
        k, v = fake_quantize(k, kvspec), fake_quantize(v, kvspec)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, s, heads * hd)
        h = h + F.linear(fa(o), fw(at.o_proj))
        mlp = layer.mlp
        x = fa(_rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps))
        a = F.silu(F.linear(x, fw(mlp.gate_proj))) * F.linear(x, fw(mlp.up_proj))
        if f["R4"]:
            a = hadamard_transform(a)
        h = h + F.linear(fa(a), fw(mlp.down_proj))
    h = _rms(h, model.model.norm.weight, cfg.rms_norm_eps)
    return F.linear(h, model.lm_head.weight)


@pytest.mark.parametrize("symmetric", [False, True])
def test_qat_forward_matches_independent_reference(tiny_checkpoints, symmetric):
    model = _load(tiny_checkpoints["llama"], weight_symmetric=symmetric, activation_symmetric=symmetric,
                  kv_symmetric=symmetric, rotation_config={"R1": True, "layers": MIXED}, **W4A4KV4).eval()
    cfg = model.config.quantization_config
    ids = sample_ids()
    with torch.no_grad():
        out = model(ids).logits
        ref = reference_llama_forward(model, ids, cfg.weight_spec, cfg.activation_spec, cfg.kv_spec, MIXED)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
    # quantization really changes the function
    set_quantization_enabled(model, False)
    with torch.no_grad():
        fp = model(ids).logits
    assert (fp - out).abs().max() > 1e-2 * fp.abs().max()


def test_kv_quantized_generation_with_cache_matches_full_forward(tiny_checkpoints):
    model = _load(tiny_checkpoints["qwen2"], rotation_search="all", **W4A4KV4).eval()
    ids = sample_ids(batch=1, seq=12)
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        out = model(ids[:, :-4], use_cache=True)
        cache = output_cache(out)
        for t in range(ids.shape[1] - 4, ids.shape[1]):
            out = model(ids[:, t : t + 1], **{CACHE_KW: cache}, use_cache=True)
            cache = output_cache(out)
    assert torch.allclose(out.logits[0, -1], full, rtol=1e-4, atol=1e-4 * full.abs().max())
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_loss_decreases_and_gradients_reach_every_weight(tiny_checkpoints, kind):
    torch.manual_seed(0)
    model = _load(tiny_checkpoints[kind], rotation_search="all", **W4A4KV4)
    model.train()
    ids = sample_ids(batch=4, seq=24, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_trainer_accepts_full_finetuning(tiny_checkpoints):
    from transformers.trainer_utils import validate_quantization_for_training

    model = _load(tiny_checkpoints["llama"])
    validate_quantization_for_training(model)  # raises if is_trainable / is_qat_trainable are not both true
    assert model.hf_quantizer.is_qat_trainable is True and model.hf_quantizer.is_trainable is True


@pytest.mark.parametrize("kind", ["llama_npow2_tied", "gpt_neox", "qwen3"])
def test_master_checkpoint_round_trip(tiny_checkpoints, tmp_path, kind):
    model = _load(tiny_checkpoints[kind], rotation_search="none", **W4A4KV4).eval()
    n = get_state(model).adapter.num_layers(model)
    flags = [{"R2": i % 2 == 0, "R3": True, "R4": i % 2 == 1} for i in range(n)]
    set_rotation_config(model, {"R1": True, "layers": flags})
    ids = sample_ids()
    with torch.no_grad():
        before = model(ids).logits
    with save_format(model, "master"):
        model.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"checkpoint_format": "master"' in saved and '"quant_method": "roste"' in saved
    assert "roste_" not in saved.split('"quantization_config"')[0], "the attention wrapper name must not be saved"
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True, attn_implementation="eager"
    )
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert get_state(reloaded).applied["layers"] == flags
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)
    sd1, sd2 = model.state_dict(), reloaded.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
