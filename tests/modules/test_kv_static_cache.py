"""RoSTEQuantizedStaticCache: static-shape K/V buffers of packed codes, the QAT function, torch.compile.

References: transformers' ``StaticLayer`` / ``StaticSlidingWindowLayer`` / ``StaticCache`` holding K/V
in the model dtype, whose full buffer the QAT attention wrapper fake-quantizes at every step (the QAT
function with a static cache), and the dynamic :class:`RoSTEQuantizedCache`.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CACHE_KW, VOCAB, output_cache, sample_ids
from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from hf_roste import RoSTEConfig, get_state, set_quantization_enabled
from hf_roste import numerics as nx
from hf_roste.modules.attention import AttentionQuantState
from hf_roste.modules.kv_cache import RoSTEQuantizedCache, cache_bytes_per_token
from hf_roste.modules.kv_static_cache import (
    RoSTEQuantizedStaticCache,
    RoSTEQuantizedStaticLayer,
    RoSTEQuantizedStaticSlidingWindowLayer,
    static_zero_point_dtype,
)
from hf_roste.numerics import QuantSpec, fake_quantize, packed_length
from hf_roste.numerics.hadamard import hadamard_transform

W4A4KV4 = dict(weight_bits=4, activation_bits=4, kv_bits=4)
PROMPT, NEW = 10, 8
SLOTS = PROMPT + NEW - 1  # generate() sizes a static cache for max_length - 1 tokens (the last is never fed back)


def _rows(seed: int, n: int, d: int = 64, dtype=torch.float32, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, n, d, generator=g) * torch.rand(batch, 3, n, 1, generator=g) * 4
    x[0, 0, 0] = 2.5  # constant row
    if n > 1:
        x[0, 1, 1] = 0.0  # all-zero row
        x[1, 2, 1] = torch.rand(d, generator=g) + 100.0  # far from 0: a zero point far outside int8
    return x.to(dtype)


def _state(spec: QuantSpec, r3: bool = False) -> AttentionQuantState:
    return AttentionQuantState(r3=r3, kv_spec=spec)


# --------------------------------------------------------------------------- layer-level exactness
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_layer_returns_fake_quant_of_static_layer_bit_for_bit(bits, symmetric, dtype):
    """Every returned row (used slots and empty ones) is what the QAT wrapper computes from a StaticLayer."""
    spec = QuantSpec(bits, symmetric=symmetric, clip_ratio=0.9, granularity="token_head")
    r3 = bits % 2 == 0
    ours, ref = RoSTEQuantizedStaticLayer(_state(spec, r3), max_cache_len=16), StaticLayer(max_cache_len=16)
    addresses = None
    for step, n in enumerate([5, 1, 1, 3]):
        k, v = _rows(step, n, dtype=dtype), _rows(100 + step, n, dtype=dtype)
        got_k, got_v = ours.update(k, v)
        exp_k, exp_v = ref.update(k, v)
        assert got_k.shape == (2, 3, 16, 64) and got_k.dtype == dtype
        assert torch.equal(got_k, fake_quantize(hadamard_transform(exp_k) if r3 else exp_k, spec))
        assert torch.equal(got_v, fake_quantize(exp_v, spec))
        assert int(ours.get_seq_length()) == int(ref.get_seq_length())
        assert ours.get_mask_sizes(n) == ref.get_mask_sizes(n)
        ptrs = [t.data_ptr() for t in ours._buffers()]
        assert addresses is None or ptrs == addresses  # written in place: static addresses
        addresses = ptrs
    # what is stored: packed uint8 codes, fp32 scales, integer zero points; never K/V in the model dtype
    assert ours.keys is None and ours.values is None
    assert ours.codes.dtype == torch.uint8 and ours.codes.shape == (2, 2, 3, 16, packed_length(64, bits))
    assert ours.scale.dtype == torch.float32 and ours.scale.shape == (2, 2, 3, 16, 1)
    if symmetric:
        assert ours.zero is None
    else:
        assert ours.zero.dtype == static_zero_point_dtype(spec, dtype)


def test_static_layer_group_granularity_fp16_scales_and_reset():
    spec = QuantSpec(4, granularity="group", group_size=16)
    exact = RoSTEQuantizedStaticLayer(_state(spec, True), max_cache_len=8)
    half = RoSTEQuantizedStaticLayer(_state(spec, True), max_cache_len=8, scale_dtype=torch.float16)
    k = _rows(0, 4, dtype=torch.bfloat16)
    got, _ = exact.update(k, k)
    assert exact.scale.shape == (2, 2, 3, 8, 4)
    ref = fake_quantize(hadamard_transform(torch.cat([k, k.new_zeros(2, 3, 4, 64)], -2)), spec)
    assert torch.equal(got, ref)
    rounded, _ = half.update(k, k)
    assert half.scale.dtype == torch.float16
    assert 0 < (rounded.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()  # not the QAT function
    codes = exact.codes
    exact.reset()
    assert exact.codes is codes and int(exact.get_seq_length()) == 0
    k2 = _rows(1, 2, dtype=torch.bfloat16)
    got, _ = exact.update(k2, k2)
    assert torch.equal(got, fake_quantize(hadamard_transform(torch.cat([k2, k2.new_zeros(2, 3, 6, 64)], -2)), spec))


def test_static_sliding_layer_matches_static_sliding_window_layer():
    spec = QuantSpec(4, granularity="token_head")
    ours = RoSTEQuantizedStaticSlidingWindowLayer(_state(spec), max_cache_len=32, sliding_window=4)
    ref = StaticSlidingWindowLayer(max_cache_len=32, sliding_window=4)
    assert ours.max_cache_len == ref.max_cache_len == 4 and not ours.is_croppable
    # fill below the window, overflow from a partial buffer, full + one token, full + several tokens
    for step, n in enumerate([2, 3, 1, 1, 2, 1]):
        for q in (1, n):
            assert ours.get_mask_sizes(q) == ref.get_mask_sizes(q)
        k = _rows(step, n)
        got, _ = ours.update(k, k)
        exp, _ = ref.update(k, k)
        assert torch.equal(got, fake_quantize(exp, spec))
        assert ours.get_seq_length() == ref.get_seq_length()
    small = RoSTEQuantizedStaticSlidingWindowLayer(_state(spec), max_cache_len=3, sliding_window=4)
    small_ref = StaticSlidingWindowLayer(max_cache_len=3, sliding_window=4)
    k = _rows(9, 3)
    small.update(k, k)
    small_ref.update(k, k)
    small.crop(-1)
    small_ref.crop(-1)
    assert small.is_croppable and small.get_seq_length() == small_ref.get_seq_length() == 2
    k = _rows(10, 1)
    got, _ = small.update(k, k)
    assert torch.equal(got, fake_quantize(small_ref.update(k, k)[0], spec))


@pytest.mark.parametrize(("dtype", "significand"), [(torch.bfloat16, 8), (torch.float16, 11)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_point_storage_holds_the_widest_zero_points(dtype, significand, bits):
    """Rows of one sign spanning one step of the K/V format give the largest zero points; the static
    buffer's dtype (chosen before any token is seen) holds them: decoding stays the QAT function."""
    spec = QuantSpec(bits, granularity="token_head")
    zdtype = static_zero_point_dtype(spec, dtype)
    assert zdtype == torch.int16
    top = 2.0 ** (significand + 1)  # the format's spacing just below 2^(p+1) is 2: mn / (mx - mn) = 2^p - 1
    x = torch.full((1, 2, 4, 8), top - 2.0, dtype=torch.float32)
    x[..., 0] = top
    x[0, 1] *= -1  # the negative twin: |mn| / (mx - mn) = 2^p
    x[:, :, 2:] *= 2.0 ** -10  # same ratios at smaller (still normal) magnitudes
    x = x.to(dtype)
    _, _, zero = nx.quantize(x, spec)
    levels = 2**bits - 1
    assert zero.abs().max() > 127  # int8 (the dynamic cache's first choice) would not hold them
    assert zero.abs().max() <= torch.iinfo(zdtype).max
    assert zero.abs().max() >= levels * (2 ** (significand - 1))  # the bound is nearly reached
    layer = RoSTEQuantizedStaticLayer(_state(spec), max_cache_len=4)
    got, _ = layer.update(x, x)
    assert torch.equal(got, fake_quantize(x, spec))
    assert static_zero_point_dtype(spec, torch.float32) == torch.int32
    assert static_zero_point_dtype(QuantSpec(8, granularity="token_head"), torch.bfloat16) == torch.int32


def test_static_cache_update_compiles_without_graph_breaks():
    spec = QuantSpec(4, granularity="token_head")
    def pair(sliding: bool):
        if sliding:
            return [RoSTEQuantizedStaticSlidingWindowLayer(_state(spec, True), max_cache_len=12, sliding_window=4)
                    for _ in range(2)]
        return [RoSTEQuantizedStaticLayer(_state(spec, True), max_cache_len=12) for _ in range(2)]

    for layer, ref in (pair(False), pair(True)):
        prompt = _rows(0, 5, dtype=torch.bfloat16)
        layer.update(prompt, prompt)
        ref.update(prompt, prompt)
        torch._dynamo.reset()
        try:
            step = torch.compile(layer.update, backend="aot_eager", fullgraph=True)
            for i in range(3):
                k = _rows(i + 1, 1, dtype=torch.bfloat16)
                got, _ = step(k, k)
                exp, _ = ref.update(k, k)  # eager
                assert torch.equal(got, exp)
        finally:
            torch._dynamo.reset()
        assert int(layer.cumulative_length_int if layer.is_sliding else layer.get_seq_length()) == 8


# --------------------------------------------------------------------------- memory
def _config(head_dim: int) -> LlamaConfig:
    heads = 768 // head_dim
    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=heads,
                       num_key_value_heads=heads, head_dim=head_dim, vocab_size=VOCAB, max_position_embeddings=512)


@pytest.mark.parametrize(("head_dim", "symmetric", "ratio"),
                         [(64, False, 38 / 128), (64, True, 36 / 128), (128, False, 70 / 256), (128, True, 68 / 256)])
def test_bytes_per_token_vs_bf16_static_cache(head_dim, symmetric, ratio):
    """bf16 K/V, 4-bit codes: allocated bytes per slot against transformers' bf16 StaticCache."""
    config = _config(head_dim)
    heads = config.num_key_value_heads
    spec = QuantSpec(4, symmetric=symmetric, granularity="token_head")
    states = [_state(spec, i % 2 == 0) for i in range(12)]
    for st in states:
        st.kv_quantized_by_cache = True  # as the attention pre-hook does inside a forward
    cache = RoSTEQuantizedStaticCache.from_states(states, config, max_cache_len=48)
    ref = StaticCache(config=config, max_cache_len=48)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        for n in (32, 1):
            k = torch.randn(1, heads, n, head_dim, generator=g).to(torch.bfloat16)
            cache.update(k, k, i)
            ref.update(k, k, i)
    quant, bf16 = cache_bytes_per_token(cache), cache_bytes_per_token(ref)
    assert bf16 == 2 * 12 * heads * head_dim * 2
    zero_bytes = 0 if symmetric else 2  # int16 zero points for bf16 K/V
    assert quant == 2 * 12 * heads * (head_dim // 2 + 4 + zero_bytes)
    assert quant / bf16 == pytest.approx(ratio) and quant / bf16 <= 0.3
    assert cache.nbytes == quant * 48


# --------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory):
    """{(kind, kv_symmetric): (QAT model, packed reload)} for llama, qwen2 and mistral (sliding window 8)."""
    out = {}
    for kind in ("llama", "qwen2", "mistral"):
        for sym in (False, True):
            qat = AutoModelForCausalLM.from_pretrained(
                tiny_checkpoints[kind], quantization_config=RoSTEConfig(kv_symmetric=sym, **W4A4KV4),
                dtype=torch.float32, attn_implementation="eager").eval()
            path = tmp_path_factory.mktemp(f"static_{kind}_{sym}")
            qat.save_pretrained(path)
            packed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
            out[kind, sym] = (qat, packed.eval())
    return out


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


def _check_static_cache(cache, model, batch: int, length: int, symmetric: bool) -> None:
    adapter = get_state(model).adapter
    _, kv_heads, head_dim = adapter.head_layout(model)
    assert isinstance(cache, RoSTEQuantizedStaticCache) and isinstance(cache, StaticCache)
    for layer in cache.layers:
        slots = min(length, layer.sliding_window) if layer.is_sliding else length
        assert layer.keys is None and layer.values is None
        assert layer.codes.dtype == torch.uint8
        assert layer.codes.shape == (2, batch, kv_heads, slots, packed_length(head_dim, 4))
        assert layer.scale.dtype == torch.float32 and layer.scale.shape == (2, batch, kv_heads, slots, 1)
        assert (layer.zero is None) == symmetric
        if not symmetric:
            assert layer.zero.dtype == torch.int32  # fp32 K/V
    per_head = head_dim // 2 + 4 + (0 if symmetric else 4)
    assert cache.nbytes == sum(2 * kv_heads * layer.token_slots * per_head for layer in cache.layers)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_static_generation_is_the_qat_function(models, kind, symmetric):
    """Greedy static generation (QAT and packed): the dynamic RoSTEQuantizedCache's tokens, and bit for bit
    the logits of the same model with transformers' StaticCache fake-quantized by the attention wrapper."""
    qat, packed = models[kind, symmetric]
    ids = sample_ids(1, PROMPT, seed=3)
    runs = {}
    for name, model in (("qat", qat), ("packed", packed)):
        static = _generate(model, ids, cache_implementation="static")
        dynamic = _generate(model, ids)
        fake = _generate(model, ids, **{CACHE_KW: StaticCache(config=model.config, max_cache_len=SLOTS)})
        assert isinstance(output_cache(dynamic), RoSTEQuantizedCache)
        assert type(output_cache(fake)) is StaticCache
        _check_static_cache(output_cache(static), model, 1, SLOTS, symmetric)
        assert torch.equal(static.sequences, dynamic.sequences), name
        assert torch.equal(static.sequences, fake.sequences), name
        ls, lf = torch.stack(static.logits), torch.stack(fake.logits)
        assert torch.equal(ls, lf), (name, (ls - lf).abs().max())
        ld = torch.stack(dynamic.logits)
        assert (ls - ld).abs().max() <= 1e-5 * ld.abs().max()  # other shapes (masked slots): fp32 rounding only
        runs[name] = ls
    # the packed reload computes the QAT model's function (integer kernels: fp32 rounding only)
    assert (runs["packed"] - runs["qat"]).abs().max() <= 1e-4 * runs["qat"].abs().max()


def test_static_generation_batched_left_padding_and_beams(models):
    qat, packed = models["llama", False]
    a, b = sample_ids(1, PROMPT, seed=5), sample_ids(1, PROMPT - 3, seed=6)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for model in (qat, packed):
        static = _generate(model, ids, attention_mask=mask, pad_token_id=0, cache_implementation="static")
        dynamic = _generate(model, ids, attention_mask=mask, pad_token_id=0)
        fake = _generate(model, ids, attention_mask=mask, pad_token_id=0,
                         **{CACHE_KW: StaticCache(config=model.config, max_cache_len=SLOTS)})
        _check_static_cache(output_cache(static), model, 2, SLOTS, False)
        assert torch.equal(static.sequences, dynamic.sequences)
        assert torch.equal(torch.stack(static.logits), torch.stack(fake.logits))
        singles = [_generate(model, x, cache_implementation="static").sequences[0, -NEW:] for x in (a, b)]
        assert torch.equal(static.sequences[0, -NEW:], singles[0])
        assert torch.equal(static.sequences[1, -NEW:], singles[1])
        kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
        with torch.no_grad():
            beams_static = model.generate(ids[:1], cache_implementation="static", **kw)
            beams_dynamic = model.generate(ids[:1], **kw)
        assert torch.equal(beams_static, beams_dynamic)


def test_cache_selection_and_explicit_cache(models, tiny_checkpoints):
    qat, packed = models["qwen2", False]
    ids = sample_ids(1, 6)
    with torch.no_grad():
        explicit = RoSTEQuantizedStaticCache(packed, max_cache_len=6 + NEW)
        given = _generate(packed, ids, **{CACHE_KW: explicit})
    assert output_cache(given) is explicit
    static = _generate(packed, ids, cache_implementation="static")
    assert torch.equal(given.sequences, static.sequences)
    chunked = _generate(packed, ids, cache_implementation="static", prefill_chunk_size=4)  # allocated up front
    assert isinstance(output_cache(chunked), RoSTEQuantizedStaticCache)
    assert torch.equal(chunked.sequences, static.sequences)
    assert not any(s.kv_quantized_by_cache for s in get_state(packed).attention_states)  # hooks cleared the flag
    # K/V not quantized (quantization off, kv_bits=16, fp8 K/V): transformers' StaticCache
    set_quantization_enabled(qat, False)
    try:
        assert type(output_cache(_generate(qat, ids, cache_implementation="static"))) is StaticCache
    finally:
        set_quantization_enabled(qat, True)
    for cfg in (dict(weight_bits=4, activation_bits=4, kv_bits=16),
                dict(weight_bits=4, activation_bits=4, kv_bits=8, kv_format="fp8_e4m3")):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], quantization_config=RoSTEConfig(**cfg),
                                                     dtype=torch.float32).eval()
        assert type(output_cache(_generate(model, ids, cache_implementation="static"))) is StaticCache
        with pytest.raises(ValueError, match="bits=16|fp8"):
            RoSTEQuantizedStaticCache(model, max_cache_len=8)


def test_errors(models, tiny_checkpoints):
    qat, _ = models["llama", False]
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    with pytest.raises(ValueError, match="not prepared for RoSTE"):
        RoSTEQuantizedStaticCache(plain, max_cache_len=8)
    cache = RoSTEQuantizedStaticCache(qat, max_cache_len=8)
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="install_kv_cache_hooks"):  # outside the model's forward
        cache.update(k, k, 0)
    spec = QuantSpec(4, granularity="token_head")
    with pytest.raises(ValueError, match="max_cache_len"):
        RoSTEQuantizedStaticLayer(_state(spec), max_cache_len=0)
    with pytest.raises(ValueError, match="scale_dtype"):
        RoSTEQuantizedStaticLayer(_state(spec), max_cache_len=4, scale_dtype=torch.bfloat16)
    layer = RoSTEQuantizedStaticLayer(_state(spec), max_cache_len=4)
    layer.update(k, k)
    with pytest.raises(ValueError, match="do not fit"):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    off = AttentionQuantState(r3=False, kv_spec=spec, quant_enabled=False)
    with pytest.raises(RuntimeError, match="disabled"):
        RoSTEQuantizedStaticLayer(off, max_cache_len=4).update(k, k)
    with pytest.raises(ValueError, match="per-tensor"):
        RoSTEQuantizedStaticCache.from_states([_state(QuantSpec(4, granularity="tensor"))] * 2, qat.config, 8)


# --------------------------------------------------------------------------- torch.compile
def test_compiled_decode_step_is_one_graph(models):
    """A decode step of the QAT model with the static quantized cache: one graph, no break."""
    qat, _ = models["llama", False]
    ids = sample_ids(1, PROMPT, seed=8)
    cache = RoSTEQuantizedStaticCache(qat, max_cache_len=PROMPT + 2)
    with torch.no_grad():
        qat(ids, **{CACHE_KW: cache}, use_cache=True)
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(qat.forward)(ids[:, -1:], **{CACHE_KW: cache}, use_cache=True)
        finally:
            torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert int(cache.get_seq_length()) == PROMPT + 1  # the traced step wrote its token


def test_compiled_static_generation_equals_eager(models):
    """``torch.compile(forward)`` (aot_eager: Dynamo + AOTAutograd, no inductor codegen) generates the eager
    tokens and logits; Mistral's sliding layers go through the fill, overflow and roll paths (window 8).
    The packed model's compiled static generation is tested in tests/test_gpu_inference.py."""
    model, _ = models["mistral", False]
    ids = sample_ids(2, PROMPT, seed=9)
    eager = _generate(model, ids, cache_implementation="static")
    forward = model.forward
    torch._dynamo.reset()
    try:
        model.forward = torch.compile(forward, backend="aot_eager")
        compiled = _generate(model, ids, cache_implementation="static")
    finally:
        model.forward = forward
        torch._dynamo.reset()
    assert isinstance(output_cache(compiled), RoSTEQuantizedStaticCache)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert torch.equal(torch.stack(compiled.logits), torch.stack(eager.logits))
