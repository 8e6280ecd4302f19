"""RoSTEQuantizedCache: K/V stored as packed codes, generation equal to the QAT (fake-quant) function.

Reference paths: a plain ``DynamicCache`` (the attention wrapper fake-quantizes the whole cached K/V
at every step) and full no-cache forwards of the generated sequence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CACHE_KW, VOCAB, output_cache, sample_ids
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from hf_roste import RoSTEConfig, get_state, set_quantization_enabled, set_rotation_config
from hf_roste import numerics as nx
from hf_roste.modules.attention import AttentionQuantState
from hf_roste.modules.kv_cache import (
    PackedKV,
    RoSTEQuantizedCache,
    RoSTEQuantizedLayer,
    RoSTEQuantizedSlidingWindowLayer,
    cache_bytes_per_token,
    expected_bytes_per_token,
)
from hf_roste.numerics import QuantSpec, fake_quantize, packed_length
from hf_roste.numerics.hadamard import hadamard_transform


def _encode(x: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32) -> PackedKV:
    """Reference codec (the test oracle of the fast KV codec): the public quantize -> to_unsigned -> pack."""
    codes, scale, zero = nx.quantize(x, spec)
    packed = nx.pack_codes(nx.to_unsigned(codes, spec), spec.bits)
    zq = None
    if not spec.symmetric:
        fits = zero.numel() == 0 or float(zero.abs().max()) <= 127
        zq = zero.to(torch.int8 if fits else torch.int32)
    return PackedKV(packed, scale.to(scale_dtype), zq, spec, x.shape[-1])


def _decode(p: PackedKV) -> torch.Tensor:
    """Reference decode: unpack -> from_unsigned -> dequantize in fp32 (fake_quantize's value with fp32 scales)."""
    codes = nx.unpack_codes(p.codes, p.spec.bits, p.head_dim)
    if p.spec.symmetric:
        codes = nx.from_unsigned(codes, p.spec)
    scale = p.scale.float()
    zero = torch.zeros_like(scale) if p.zero is None else p.zero.float()
    return nx.dequantize(codes, scale, zero, p.spec, dtype=torch.float32)

W4A4KV4 = dict(weight_bits=4, activation_bits=4, kv_bits=4)
PROMPT, NEW = 12, 10


def _load(path, **cfg):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(**cfg), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _mixed_r3(model):
    """R3 on in even layers only (R2/R4 alternate too)."""
    n = get_state(model).adapter.num_layers(model)
    flags = [{"R2": i % 2 == 1, "R3": i % 2 == 0, "R4": i % 2 == 1} for i in range(n)]
    set_rotation_config(model, {"R1": True, "layers": flags})
    assert [s.r3 for s in get_state(model).attention_states] == [i % 2 == 0 for i in range(n)]


def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


def _kv_shape(model):
    adapter = get_state(model).adapter
    _, kv_heads, head_dim = adapter.head_layout(model)
    return kv_heads, head_dim


# --------------------------------------------------------------------------- generation equivalence
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox", "mistral"])
def test_generation_matches_dynamic_cache_and_full_forward(tiny_checkpoints, kind):
    model = _load(tiny_checkpoints[kind], rotation_search="none", **W4A4KV4)
    _mixed_r3(model)
    ids = sample_ids(batch=1, seq=PROMPT, seed=1)
    with torch.no_grad():
        quant = _generate(model, ids)  # default cache
        dyn = _generate(model, ids, **{CACHE_KW: DynamicCache(config=model.config)})
        full = model(quant.sequences).logits[0, PROMPT - 1 : -1]
    assert isinstance(output_cache(quant), RoSTEQuantizedCache)
    assert isinstance(output_cache(dyn), DynamicCache)
    assert torch.equal(quant.sequences, dyn.sequences)
    lq, ld = torch.stack(quant.logits, 1)[0], torch.stack(dyn.logits, 1)[0]
    scale = full.abs().max()
    assert (lq - ld).abs().max() <= 1e-6 * scale  # measured: bit-identical (0.0) on CPU
    assert (lq - full).abs().max() <= 1e-5 * scale
    # greedy tokens are the argmax of full forwards
    assert torch.equal(quant.sequences[0, PROMPT:], full.argmax(-1))

    # what the cache holds: packed uint8 codes, fp32 per-token-per-head scales, int8 zero points
    cache = output_cache(quant)
    kv_heads, head_dim = _kv_shape(model)
    total = PROMPT + NEW - 1  # the last generated token is never fed back
    for layer in cache.layers:
        for packed in (layer.packed_keys, layer.packed_values):
            n = packed.seq_len
            assert n == (min(total, layer.sliding_window - 1) if layer.is_sliding else total)
            assert packed.codes.dtype == torch.uint8
            assert packed.codes.shape == (1, kv_heads, n, packed_length(head_dim, 4))
            assert packed.scale.dtype == torch.float32 and packed.scale.shape == (1, kv_heads, n, 1)
            assert packed.zero.dtype == torch.int8 and packed.zero.shape == (1, kv_heads, n, 1)
    spec = model.config.quantization_config.kv_spec
    expected = expected_bytes_per_token(len(cache.layers), kv_heads, head_dim, spec)
    assert expected == 2 * len(cache.layers) * kv_heads * (head_dim // 2 + 4 + 1)
    assert cache_bytes_per_token(cache) == expected
    assert cache.nbytes == sum(
        2 * kv_heads * layer.stored_length * (head_dim // 2 + 5) for layer in cache.layers
    )
    if kind == "mistral":
        assert all(layer.is_sliding for layer in cache.layers)
        assert cache.get_seq_length() == total


def test_manual_decoding_with_quantized_cache_matches_full_forward(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"], rotation_search="all", **W4A4KV4)
    ids = sample_ids(batch=1, seq=14, seed=2)
    cache = RoSTEQuantizedCache(model)
    with torch.no_grad():
        full = model(ids).logits[0]
        out = model(ids[:, :-4], **{CACHE_KW: cache}, use_cache=True)
        steps = [out.logits[0, -1]]
        for t in range(ids.shape[1] - 4, ids.shape[1]):
            out = model(ids[:, t : t + 1], **{CACHE_KW: cache}, use_cache=True)
            steps.append(out.logits[0, -1])
    assert output_cache(out) is cache and cache.get_seq_length() == ids.shape[1]
    ref = full[ids.shape[1] - 5 :]
    assert (torch.stack(steps) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # after the forward the wrapper's flag is cleared: a later DynamicCache call quantizes again
    assert not any(s.kv_quantized_by_cache for s in get_state(model).attention_states)


def test_batched_left_padded_generation(tiny_checkpoints):
    model = _load(tiny_checkpoints["llama"], rotation_search="none", **W4A4KV4)
    _mixed_r3(model)
    a = sample_ids(batch=1, seq=PROMPT, seed=3)
    b = sample_ids(batch=1, seq=PROMPT - 4, seed=4)
    pad = 0
    ids = torch.cat([a, torch.cat([torch.full((1, 4), pad), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        quant = _generate(model, ids, attention_mask=mask, pad_token_id=pad)
        dyn = _generate(model, ids, attention_mask=mask, pad_token_id=pad,
                        **{CACHE_KW: DynamicCache(config=model.config)})
        singles = [_generate(model, x).sequences[0, -NEW:] for x in (a, b)]
    assert isinstance(output_cache(quant), RoSTEQuantizedCache)
    assert output_cache(quant).layers[0].packed_keys.batch_size == 2
    assert torch.equal(quant.sequences, dyn.sequences)
    lq, ld = torch.stack(quant.logits, 1), torch.stack(dyn.logits, 1)
    assert (lq - ld).abs().max() <= 1e-6 * ld.abs().max()
    assert torch.equal(quant.sequences[0, -NEW:], singles[0])
    assert torch.equal(quant.sequences[1, -NEW:], singles[1])


def test_beam_search_matches_dynamic_cache(tiny_checkpoints):
    model = _load(tiny_checkpoints["qwen2"], rotation_search="all", **W4A4KV4)
    ids = sample_ids(batch=2, seq=8, seed=5)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        quant = model.generate(ids, **kw)
        dyn = model.generate(ids, **{CACHE_KW: DynamicCache(config=model.config)}, **kw)
    assert torch.equal(quant, dyn)


# --------------------------------------------------------------------------- default-cache selection
def _default_cache(model, ids):
    with torch.no_grad():
        return output_cache(_generate(model, ids))


def test_default_cache_selection(tiny_checkpoints):
    ids = sample_ids(batch=1, seq=6)
    fp_kv = _load(tiny_checkpoints["llama"], weight_bits=4, activation_bits=4, kv_bits=16)
    assert type(_default_cache(fp_kv, ids)) is DynamicCache
    with pytest.raises(ValueError, match="bits=16"):
        RoSTEQuantizedCache(fp_kv)

    model = _load(tiny_checkpoints["llama"], **W4A4KV4)
    assert isinstance(_default_cache(model, ids), RoSTEQuantizedCache)
    set_quantization_enabled(model, False)  # full-precision function: plain cache
    assert type(_default_cache(model, ids)) is DynamicCache
    set_quantization_enabled(model, True)
    with torch.no_grad():  # explicit choices win
        out = model.generate(ids, max_new_tokens=2, cache_implementation="dynamic", return_dict_in_generate=True)
    assert type(output_cache(out)) is DynamicCache
    clone = copy.deepcopy(model)  # the generate hook follows the copy
    assert clone._prepare_cache_for_generation.__self__ is clone
    assert isinstance(_default_cache(clone, ids), RoSTEQuantizedCache)


def test_errors(tiny_checkpoints):
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    with pytest.raises(ValueError, match="not prepared for RoSTE"):
        RoSTEQuantizedCache(plain)
    model = _load(tiny_checkpoints["llama"], **W4A4KV4)
    cache = RoSTEQuantizedCache(model)
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="install_kv_cache_hooks"):  # outside the model's forward
        cache.update(k, k, 0)
    with pytest.raises(ValueError, match="scale_dtype"):
        RoSTEQuantizedCache(model, scale_dtype=torch.bfloat16)
    state = AttentionQuantState(r3=False, kv_spec=QuantSpec(4, granularity="tensor"))
    with pytest.raises(ValueError, match="per-tensor"):
        RoSTEQuantizedCache.from_states([state] * 2, model.config)
    off = AttentionQuantState(r3=False, kv_spec=QuantSpec(4, granularity="token_head"), quant_enabled=False)
    with pytest.raises(RuntimeError, match="disabled"):
        RoSTEQuantizedLayer(off).update(k, k)


# --------------------------------------------------------------------------- layer-level exactness
def _rows(seed: int, n: int, d: int = 64, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, n, d, generator=g) * torch.rand(2, 3, n, 1, generator=g) * 4
    x[0, 0, 0] = 2.5  # constant row
    x[0, 1, 0] = 0.0  # all-zero row
    if n > 1:
        x[1, 2, 1] = torch.rand(d, generator=g) + 100.0  # far from 0: zero point -> int32
    return x.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("r3", [False, True])
def test_layer_returns_fake_quant_bit_for_bit(bits, symmetric, r3):
    spec = QuantSpec(bits, symmetric=symmetric, clip_ratio=0.9, granularity="token_head")
    layer = RoSTEQuantizedLayer(AttentionQuantState(r3=r3, kv_spec=spec))
    ks, vs = [], []
    for step, n in enumerate([5, 1, 1, 3]):
        k, v = _rows(step, n), _rows(100 + step, n)
        ks.append(k)
        vs.append(v)
        got_k, got_v = layer.update(k, v)
        kk = torch.cat(ks, -2)
        ref_k = fake_quantize(hadamard_transform(kk) if r3 else kk, spec)
        ref_v = fake_quantize(torch.cat(vs, -2), spec)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    assert layer.packed_keys.codes.dtype == torch.uint8
    assert layer.packed_keys.codes.shape[-1] == packed_length(64, bits)
    if symmetric:
        assert layer.packed_keys.zero is None
    else:  # the far-off V row needed a wide zero point: promoted (losslessly) to int32
        assert layer.packed_values.zero.dtype == torch.int32


def test_layer_bf16_and_group_granularity():
    spec = QuantSpec(4, granularity="group", group_size=16)
    layer = RoSTEQuantizedLayer(AttentionQuantState(r3=True, kv_spec=spec))
    k1, k2 = _rows(0, 4, dtype=torch.bfloat16), _rows(1, 1, dtype=torch.bfloat16)
    layer.update(k1, k1)
    got_k, got_v = layer.update(k2, k2)
    kk = torch.cat([k1, k2], -2)
    assert got_k.dtype == torch.bfloat16
    assert torch.equal(got_k, fake_quantize(hadamard_transform(kk), spec))
    assert torch.equal(got_v, fake_quantize(kk, spec))
    assert layer.packed_keys.scale.shape == (2, 3, 5, 4)


def test_sliding_layer_semantics_match_dynamic_sliding_layer():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    spec = QuantSpec(4, granularity="token_head")
    ours = RoSTEQuantizedSlidingWindowLayer(AttentionQuantState(r3=False, kv_spec=spec), sliding_window=4)
    ref = DynamicSlidingWindowLayer(sliding_window=4)
    for step, n in enumerate([6, 1, 1, 2]):
        k = _rows(step, n)
        got, _ = ours.update(k, k)
        exp, _ = ref.update(k, k)
        assert torch.equal(got, fake_quantize(exp, spec))
        assert ours.get_seq_length() == ref.get_seq_length()
        assert ours.stored_length == ref.keys.shape[-2] == 3
        for q in (1, 3):
            assert ours.get_mask_sizes(q) == ref.get_mask_sizes(q)
    # past recording + crop keep the same states as DynamicSlidingWindowLayer
    ours.activate_past_recording()
    ref.activate_past_recording()
    k = _rows(9, 3)
    ours.update(k, k)
    ref.update(k, k)
    ours.crop(-2)
    ref.crop(-2)
    assert ours.get_seq_length() == ref.get_seq_length()
    assert torch.equal(_decode(ours.packed_keys), fake_quantize(ref.keys, spec))


def test_crop_reorder_select_and_reset():
    spec = QuantSpec(4, granularity="token_head")
    layer = RoSTEQuantizedLayer(AttentionQuantState(r3=True, kv_spec=spec))
    k = _rows(0, 6)
    full, _ = layer.update(k, k)
    layer.crop(-2)
    assert layer.get_seq_length() == 4
    assert torch.equal(_decode(layer.packed_keys), full[:, :, :4])
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(_decode(layer.packed_keys), full[[1, 0], :, :4])
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(_decode(layer.packed_values), fake_quantize(k, spec)[[1, 0], :, :4])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes == 0 and not layer.is_initialized


# --------------------------------------------------------------------------- memory
def _llama_100m_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=VOCAB, max_position_embeddings=512)


@pytest.mark.parametrize(
    ("symmetric", "scale_dtype", "ratio"),
    [(False, torch.float32, 37 / 128), (True, torch.float32, 36 / 128), (False, torch.float16, 35 / 128)],
)
def test_bytes_per_token_vs_bf16_dynamic_cache(symmetric, scale_dtype, ratio):
    """Llama-shaped ~100M config (12 layers x 12 heads x 64): measured from the stored tensors."""
    config = _llama_100m_config()
    spec = QuantSpec(4, symmetric=symmetric, granularity="token_head")
    states = [AttentionQuantState(r3=i % 2 == 0, kv_spec=spec) for i in range(12)]
    for st in states:
        st.kv_quantized_by_cache = True  # as the attention pre-hook does inside a forward
    cache = RoSTEQuantizedCache.from_states(states, config, scale_dtype=scale_dtype)
    ref = DynamicCache(config=config)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        for n in (32, 1, 1):
            k = torch.randn(1, 12, n, 64, generator=g).to(torch.bfloat16)
            cache.update(k, k, i)
            ref.update(k, k, i)
    quant, bf16 = cache_bytes_per_token(cache), cache_bytes_per_token(ref)
    assert bf16 == 2 * 12 * 12 * 64 * 2  # 36864 bytes per token
    assert quant == expected_bytes_per_token(12, 12, 64, spec, scale_dtype)
    assert quant / bf16 == pytest.approx(ratio) and quant / bf16 <= 0.3
    assert cache.nbytes == quant * 34


def test_packed_kv_round_trip_and_fp16_scales_are_inexact():
    spec = QuantSpec(4, granularity="token_head")
    x = _rows(7, 16)
    exact = _encode(x, spec)
    assert torch.equal(_decode(exact), fake_quantize(x, spec))
    half = _encode(x, spec, torch.float16)
    err = (_decode(half) - fake_quantize(x, spec)).abs().max()
    assert 0 < err <= 2e-3 * x.abs().max()  # fp16 scale rounding: relative 2^-11 per element


# --------------------------------------------------------------------------- storage (KVStore)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("head_dim", [5, 12, 64])
def test_store_codec_matches_packed_kv(bits, symmetric, head_dim):
    """encode_kv / decode_kv (one call for K and V, bit fields written straight to fp32) produce the
    bytes, scales and zero points of the reference `_encode` and the values of `_decode`."""
    from hf_roste.modules.kv_store import decode_kv, encode_kv

    spec = QuantSpec(bits, symmetric=symmetric, granularity="token_head")
    g = torch.Generator().manual_seed(bits * 10 + head_dim)
    x = torch.randn(2, 2, 3, 7, head_dim, generator=g) * 3 + torch.randn(2, 2, 3, 7, 1, generator=g)
    x[0, 0, 0, 0] = 1.25  # constant row
    packed, scale, zero = encode_kv(x, spec)
    for i in range(2):
        ref = _encode(x[i], spec)
        assert torch.equal(packed[i].to(torch.uint8), ref.codes)
        assert torch.equal(scale[i], ref.scale)
        assert (zero is None) == (ref.zero is None) and (zero is None or torch.equal(zero[i], ref.zero.float()))
        vals = decode_kv(packed[i].to(torch.uint8), scale[i], None if zero is None else zero[i], spec, head_dim)
        assert torch.equal(vals, _decode(ref))
        assert torch.equal(vals, fake_quantize(x[i], spec))


def test_store_grows_in_place_and_crop_reuses_buffers():
    spec = QuantSpec(4, granularity="token_head")
    layer = RoSTEQuantizedLayer(AttentionQuantState(r3=False, kv_spec=spec))
    ks = [_rows(0, 20)]
    layer.update(ks[0], ks[0])
    capacities = {layer._store.capacity}
    for step in range(1, 60):  # one token per step, as in decoding
        ks.append(_rows(step, 1))
        got, _ = layer.update(ks[-1], ks[-1])
        assert torch.equal(got, fake_quantize(torch.cat(ks, -2), spec))
        capacities.add(layer._store.capacity)
    assert layer.stored_length == 79
    # growth by a quarter (at least 16 tokens): a handful of reallocations for 59 appends
    assert len(capacities) <= 5 and max(capacities) >= 79
    zero_bytes = layer.packed_keys.zero.element_size()  # _rows' far-off row promoted them to int32
    assert zero_bytes == 4
    per_token = 2 * 2 * 3 * (32 + 4 + zero_bytes)  # K and V x batch 2 x 3 heads x (codes + scale + zero)
    assert layer.nbytes == 79 * per_token
    assert layer.allocated_nbytes == layer._store.capacity * per_token >= layer.nbytes
    codes_buffer = layer._store.codes
    layer.crop(-9)  # shortens the stored length; the buffers stay and are overwritten by later tokens
    assert layer.stored_length == 70 and layer._store.codes is codes_buffer
    k = _rows(99, 2)
    got, _ = layer.update(k, k)
    assert torch.equal(got, fake_quantize(torch.cat([*ks, k], -2)[:, :, list(range(70)) + [79, 80]], spec))


def test_store_promotes_zero_points_after_buffers_exist():
    """An int8 zero-point buffer is widened (losslessly) the first time a later token needs it."""
    spec = QuantSpec(4, granularity="token_head")
    layer = RoSTEQuantizedLayer(AttentionQuantState(r3=False, kv_spec=spec))
    k1 = torch.randn(1, 2, 4, 8)
    layer.update(k1, k1)
    assert layer.packed_keys.zero.dtype == torch.int8
    k2 = torch.rand(1, 2, 1, 8) + 500.0  # zero point far below -127
    got, _ = layer.update(k2, k2)
    assert layer.packed_keys.zero.dtype == torch.int32
    assert torch.equal(got, fake_quantize(torch.cat([k1, k2], -2), spec))
    with pytest.raises(ValueError, match="batch"):
        layer.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))


def test_output_cache_reads_the_cache_under_either_name():
    """output_cache: the cache of a forward / generate() output, None without one, no deprecated alias."""
    import warnings

    from tiny_models import build_tiny
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = build_tiny("llama")
    ids = sample_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert isinstance(output_cache(model(ids, use_cache=True)), DynamicCache)
        assert output_cache(model(ids, use_cache=False)) is None
    assert output_cache(CausalLMOutputWithPast(logits=torch.zeros(1))) is None


@pytest.mark.parametrize("window", [2, 3, 4])
@pytest.mark.parametrize("tokens,drop", [(5, 3), (6, 3), (3, 3), (4, 1), (1, 1)])
def test_sliding_crop_matches_transformers_when_dropping_everything_stored(window, tokens, drop):
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from hf_roste.modules.kv_cache import RoSTEQuantizedSlidingWindowLayer

    ours = RoSTEQuantizedSlidingWindowLayer(AttentionQuantState(r3=False, kv_spec=QuantSpec(4, granularity="token_head")),
                                            window)
    ref = DynamicSlidingWindowLayer(window)
    k = torch.randn(1, 1, tokens, 8, generator=torch.Generator().manual_seed(tokens))
    for layer in (ours, ref):
        layer.activate_past_recording()
        layer.update(k, k)
        layer.crop(0)
        layer.crop(-drop)
    assert (ours.get_seq_length(), ours.stored_length) == (ref.get_seq_length(), ref.keys.shape[-2])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_update_with_no_new_tokens_keeps_the_cache(bits):
    from hf_roste.modules.kv_cache import RoSTEQuantizedLayer

    spec = QuantSpec(bits, granularity="token_head")
    layer = RoSTEQuantizedLayer(AttentionQuantState(r3=False, kv_spec=spec))
    x = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(bits))
    k1, v1 = layer.update(x, x)
    empty = torch.randn(1, 2, 0, 16)
    k2, v2 = layer.update(empty, empty)
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and layer.get_seq_length() == 3
    _encode(empty, spec)
