"""Every ``generate()`` mode users reach for works on every family, QAT and packed (issue 24).

Reference: the same decoding with a plain ``DynamicCache`` (the attention wrapper fake-quantizes the
whole cached K/V at every step), which computes the QAT function.  Prompt lookup and assisted
decoding with greedy verification, and a static cache, must give exactly the greedy tokens.  The
Mistral config has a sliding window (8) shorter than prompt + new tokens, so the sliding layers'
``activate_past_recording`` / ``crop`` roll-back path runs (transformers 5.25 passes
``recurrent_states_to_keep`` to every layer).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CACHE_KW, TINY_CONFIGS, sample_ids
from transformers import AutoModelForCausalLM, DynamicCache

from hf_roste import RoSTEConfig
from hf_roste.modules.kv_cache import RoSTEQuantizedCache

NEW = 12
W4A4KV4 = dict(weight_bits=4, activation_bits=4, kv_bits=4)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def models(request, tiny_checkpoints, tmp_path_factory):
    """(kind, QAT model, packed reload of it)."""
    kind = request.param
    qat = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints[kind], quantization_config=RoSTEConfig(**W4A4KV4), dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    out = tmp_path_factory.mktemp(f"gen_{kind}")
    qat.save_pretrained(out)
    packed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    return kind, qat, packed


def _gen(model, ids, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **kw)


def _dynamic(model):
    return {CACHE_KW: DynamicCache(config=model.config)}


@pytest.mark.parametrize("which", ["qat", "packed"])
def test_generation_modes(models, which):
    kind, qat, packed = models
    model = qat if which == "qat" else packed
    ids = sample_ids(1, 12)

    greedy = _gen(model, ids)
    assert greedy.shape == (1, 12 + NEW)
    assert torch.equal(greedy, _gen(model, ids, **_dynamic(model))), "greedy: RoSTE cache != fake-quant reference"

    beams = _gen(model, ids, num_beams=3)
    assert torch.equal(beams, _gen(model, ids, num_beams=3, **_dynamic(model))), "beam search"

    torch.manual_seed(1)
    sampled = _gen(model, ids, do_sample=True, top_k=8)
    torch.manual_seed(1)
    assert torch.equal(sampled, _gen(model, ids, do_sample=True, top_k=8, **_dynamic(model))), "sampling"

    assert torch.equal(_gen(model, ids, cache_implementation="static"), greedy), "static cache"
    assert torch.equal(_gen(model, ids, prompt_lookup_num_tokens=3), greedy), "prompt lookup decoding"
    assert torch.equal(_gen(model, ids, assistant_model=model), greedy), f"assisted decoding ({kind})"


def test_quantized_sliding_cache_accepts_the_roll_back_keywords(models):
    """``Cache.activate_past_recording(**kwargs)`` forwards keywords to every layer (transformers 5.25)."""
    kind, qat, _ = models
    cache = RoSTEQuantizedCache(qat)
    cache.activate_past_recording(recurrent_states_to_keep=3)
    assert all(getattr(layer, "record_past", True) for layer in cache.layers)
    if kind == "mistral":
        assert any(layer.is_sliding for layer in cache.layers)


def test_layers_accept_every_cache_layer_argument_form(models):
    """``get_mask_sizes`` receives the query length (transformers 5.25) or the new tokens' cache positions."""
    import inspect

    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    _, qat, _ = models
    cache = RoSTEQuantizedCache(qat)
    for layer in cache.layers:
        ref = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window) if layer.is_sliding else DynamicLayer()
        for _ in range(2):  # same bookkeeping as transformers' own layer (lengths set by hand, no tensors)
            assert layer.get_mask_sizes(3) == ref.get_mask_sizes(3)
            assert layer.get_mask_sizes(torch.arange(5, 8)) == ref.get_mask_sizes(3)
            if layer.is_sliding:
                layer.cumulative_length = ref.cumulative_length = layer.sliding_window + 4
        assert layer.get_max_cache_shape() == layer.get_max_length()
        # every keyword transformers passes to activate_past_recording is accepted
        params = inspect.signature(type(layer).activate_past_recording).parameters if layer.is_sliding else {}
        assert not layer.is_sliding or any(p.kind is p.VAR_KEYWORD for p in params.values())
