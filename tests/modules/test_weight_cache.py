"""Q_w(W) computed once per optimizer step: reused across micro-batches and checkpoint recomputation."""

from __future__ import annotations

import torch
from tiny_models import sample_ids
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.modules.qat_linear import QATLinear
from hf_roste.modules.weight_cache import invalidate_all
from hf_roste.numerics import QuantSpec, fake_quantize

W4 = QuantSpec(4, False, 1.0, "channel")
A4 = QuantSpec(4, False, 1.0, "token")


def _linear(seed: int = 0) -> QATLinear:
    torch.manual_seed(seed)
    return QATLinear(16, 8, weight_spec=W4, act_spec=A4).train()


def _counting(monkeypatch):
    import hf_roste.modules.qat_linear as ql

    calls = []
    monkeypatch.setattr(ql, "fake_quantize", lambda x, spec: calls.append(spec) or fake_quantize(x, spec))
    return calls


def test_reused_across_micro_batches_and_recomputed_after_step(monkeypatch):
    calls = _counting(monkeypatch)
    lin = _linear()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(3):  # gradient accumulation: three micro-batches, one step
        lin(torch.randn(4, 16)).square().sum().backward()
    assert calls.count(W4) == 1
    assert lin._weight_cache.hits == 2 and lin._weight_cache.misses == 1
    opt.step()
    lin(torch.randn(4, 16)).sum().backward()
    assert calls.count(W4) == 2
    # the recomputed value is Q_w of the updated weight
    assert torch.equal(lin.quantized_weight().detach(), fake_quantize(lin.weight.detach(), W4))


def test_cached_path_equals_uncached_path():
    cached, plain = _linear(1), _linear(1)
    plain.cache_quantized_weight = False
    opt_c = torch.optim.AdamW(cached.parameters(), lr=0.05)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(2):
            x = torch.randn(5, 16, generator=g)
            for lin in (cached, plain):
                lin(x).square().mean().backward()
        assert torch.equal(cached.weight.grad, plain.weight.grad)
        opt_c.step(), opt_p.step()
        opt_c.zero_grad(), opt_p.zero_grad()
        assert torch.equal(cached.weight, plain.weight)


def test_gradient_checkpointing_recompute_hits_the_cache(monkeypatch):
    calls = _counting(monkeypatch)
    lin = _linear(2)
    x = torch.randn(3, 16, requires_grad=True)
    checkpoint(lin, x, use_reentrant=False).sum().backward()
    assert calls.count(W4) == 1 and lin._weight_cache.hits == 1
    ref = _linear(2)
    ref.cache_quantized_weight = False
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(x.grad, x2.grad)


def test_in_place_writes_and_invalidate_all_recompute(monkeypatch):
    calls = _counting(monkeypatch)
    lin = _linear(3)
    lin(torch.randn(2, 16))
    with torch.no_grad():
        lin.weight.mul_(2.0)  # version counter bump
    out = lin.quantized_weight()
    assert torch.equal(out.detach(), fake_quantize(lin.weight.detach(), W4))
    lin.weight.data.mul_(0.5)  # .data bypasses the version counter: invalidate explicitly
    invalidate_all()
    assert torch.equal(lin.quantized_weight().detach(), fake_quantize(lin.weight.detach(), W4))
    assert calls.count(W4) == 3


def test_eval_and_no_grad_do_not_cache():
    lin = _linear(4).eval()
    lin(torch.randn(2, 16))
    assert "_weight_cache" not in lin.__dict__
    lin.train()
    with torch.no_grad():
        lin(torch.randn(2, 16))
    assert "_weight_cache" not in lin.__dict__


def test_autocast_caches_the_low_precision_weight():
    lin = _linear(5)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = lin.quantized_weight()
        y = lin(x)
    assert w.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert torch.equal(w.detach(), fake_quantize(lin.weight.detach(), W4).to(torch.bfloat16))
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32
    ref = _linear(5)
    ref.cache_quantized_weight = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = ref(x)
    y_ref.float().sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(lin.weight.grad, ref.weight.grad)


def test_model_with_accumulation_matches_uncached(tiny_checkpoints):
    def run(cache: bool):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_checkpoints["qwen2"], dtype=torch.float32, attn_implementation="eager",
            quantization_config=RoSTEConfig(weight_bits=4, activation_bits=4, kv_bits=4, rotation_search="all"),
        ).train()
        for m in model.modules():
            if isinstance(m, QATLinear):
                m.cache_quantized_weight = cache
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(2):
            for micro in range(2):
                ids = sample_ids(2, 12, seed=10 * step + micro)
                loss = model(ids, labels=ids).loss
                loss.backward()
                losses.append(loss.detach())
            opt.step()
            opt.zero_grad()
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]

    (lc, pc), (lp, pp) = run(True), run(False)
    assert torch.equal(lc, lp)
    assert all(torch.equal(a, b) for a, b in zip(pc, pp, strict=True))
