"""Load: a 2,048-token generation and a large batch keep memory bounded (growth = KV cache only) and finite."""

from __future__ import annotations

import gc
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList

from hf_roste import RoSTEConfig

from ._figures import record

# the deployed (packed) model generates 2,048 tokens; the QAT (training) model 512, to keep the folder fast
NEW_TOKENS = {"packed": 2048, "qat": 512}
PROBES = {"packed": (256, 1024, 2048), "qat": (64, 256, 512)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-token ops: 2 threads on a shared 2-core box are several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096)
    root = tmp_path_factory.mktemp("load")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(root / "fp")
    qat = AutoModelForCausalLM.from_pretrained(root / "fp", dtype=torch.float32, attn_implementation="sdpa",
                                               quantization_config=RoSTEConfig(rotation_search="all")).eval()
    qat.save_pretrained(root / "packed")
    packed = AutoModelForCausalLM.from_pretrained(root / "packed", attn_implementation="sdpa").eval()
    return {"qat": qat, "packed": packed}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every live tensor storage except those in ``exclude`` (storage pointers), each counted once."""
    total, seen = 0, set(exclude)
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                key = _storage_key(obj)
                if key not in seen:
                    seen.add(key)
                    total += obj.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - weakly referenced / exotic objects
            continue
    return total


def _cache_bytes() -> tuple[int, set[int]]:
    """Bytes of the storages held by live caches' layers (whole buffers, growth reserve included)."""
    from transformers.cache_utils import Cache

    total, keys = 0, set()
    for obj in gc.get_objects():
        if isinstance(obj, Cache):
            for layer in obj.layers:
                for v in vars(layer).values():
                    ts = [v] if isinstance(v, torch.Tensor) else list(v.tensors()) if hasattr(v, "tensors") else []
                    for t in ts:
                        if isinstance(t, torch.Tensor) and _storage_key(t) not in keys:
                            keys.add(_storage_key(t))
                            total += t.untyped_storage().nbytes()
    return total, keys


class _Probe(LogitsProcessor):
    def __init__(self, start: int, static: set[int], probes) -> None:
        self.start, self.static, self.rows, self.probes = start, static, {}, probes

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.start + 1
        if step in self.probes:
            assert torch.isfinite(scores).all(), step
            gc.collect()
            cache, cache_keys = _cache_bytes()
            other = _tensor_bytes(self.static | cache_keys)
            self.rows[step] = {"cache": cache, "other": other, "rss": psutil.Process().memory_info().rss}
        return scores


@pytest.mark.parametrize("kind", ["packed", "qat"])
def test_long_generation_memory_is_the_kv_cache(models, kind):
    model = models[kind]
    batch, new_tokens, probes = 2, NEW_TOKENS[kind], PROBES[kind]
    static = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    ids = torch.randint(0, 128, (batch, 8), generator=torch.Generator().manual_seed(0))
    probe = _Probe(ids.shape[1], static, probes)
    t0 = time.monotonic()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([probe]))
    elapsed = time.monotonic() - t0
    assert out.shape == (batch, 8 + new_tokens)
    rows = probe.rows
    assert set(rows) == set(probes), rows
    a, b = rows[probes[0]], rows[probes[-1]]
    tokens = probes[-1] - probes[0]
    cache_per_token = (b["cache"] - a["cache"]) / tokens / batch
    # everything outside the cache (ids, masks, logits, temporaries) may grow by at most a few KB per token
    other_growth = b["other"] - a["other"]
    rss_growth = b["rss"] - a["rss"]
    record(f"long_generation_{kind}", batch=batch, new_tokens=new_tokens, seconds=round(elapsed, 1),
           cache_bytes_per_token_per_sequence=round(cache_per_token, 1),
           cache_bytes_at={p: rows[p]["cache"] for p in probes}, non_cache_tensor_growth_bytes=other_growth,
           rss_growth_mb=round(rss_growth / 2**20, 1))
    assert b["cache"] > a["cache"] > 0
    assert other_growth <= 64 * tokens * batch, (other_growth, rows)
    assert rss_growth <= (b["cache"] - a["cache"]) + 64 * 2**20, rows


def test_large_batch_is_finite_and_does_not_leak(models):
    ids = torch.randint(0, 128, (64, 256), generator=torch.Generator().manual_seed(1))
    proc = psutil.Process()
    rss = {}
    for name in ("packed", "qat"):
        rss[name] = []
        for _ in range(4):
            with torch.no_grad():
                logits = models[name](ids).logits
            assert torch.isfinite(logits).all()
            del logits
            gc.collect()
            rss[name].append(proc.memory_info().rss)
    # a leak grows RSS on every repeat; a one-off allocator jump (another test's memory returned or
    # reused) moves one step only, so the smallest step after the warm-up repeat is the leak estimate
    growth = max(min(r[i + 1] - r[i] for i in range(1, len(r) - 1)) for r in rss.values())
    record("large_batch", batch=64, seq=256, rss_growth_between_repeats_mb=round(growth / 2**20, 1))
    assert growth <= 32 * 2**20, {k: [x / 2**20 for x in v] for k, v in rss.items()}
