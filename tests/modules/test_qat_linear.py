"""QATLinear: shared input quantization for linears that read the same activation."""

from __future__ import annotations

import torch
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

import hf_roste.modules.qat_linear as qat_linear
from hf_roste import RoSTEConfig
from hf_roste.modules.qat_linear import QATLinear
from hf_roste.modules.shared_input import SharedInputQuant
from hf_roste.numerics import QuantSpec


def test_q_k_v_and_gate_up_quantize_their_input_once(tiny_checkpoints, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], quantization_config=RoSTEConfig()).eval()
    ids = sample_ids()
    with torch.no_grad():
        shared_out = model(ids).logits
    calls = []
    real = qat_linear.fake_quantize
    monkeypatch.setattr(qat_linear, "fake_quantize", lambda x, spec: calls.append(spec.granularity) or real(x, spec))
    with torch.no_grad():
        model(ids)
    # per layer: 7 weights; inputs of (q,k,v), o, (gate,up), down -> 4 activation quantizations
    assert calls.count("token") == 4 * 2 and calls.count("channel") == 7 * 2
    for m in model.modules():
        if isinstance(m, QATLinear):
            m.shared_input = None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, shared_out)


def test_shared_entry_is_invalidated_by_inplace_change_and_grad_mode():
    spec = QuantSpec(4, granularity="token")
    a = QATLinear(8, 4, weight_spec=QuantSpec(4, granularity="channel"), act_spec=spec)
    b = QATLinear(8, 4, weight_spec=QuantSpec(4, granularity="channel"), act_spec=spec)
    a.shared_input = b.shared_input = SharedInputQuant()
    x = torch.randn(3, 8)
    qa = a.quantize_input(x)
    assert b.quantize_input(x) is qa
    x.mul_(2.0)
    assert b.quantize_input(x) is not qa
    assert torch.equal(b.quantize_input(x), qat_linear.fake_quantize(x, spec))
    with torch.no_grad():
        q_ng = a.quantize_input(x)
    y = x.clone().requires_grad_()
    assert a.quantize_input(y).requires_grad and not q_ng.requires_grad
