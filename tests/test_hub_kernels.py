"""transformers' hub kernels (kernelize / use_kernels) on RoSTE models, with local kernel mappings (no network)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import sample_ids
from torch import nn
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig
from hf_roste.hub_kernels import bypassing_kernels

kernels = pytest.importorskip("kernels", reason="kernels is in the dev extra (transformers' hub-kernel backend)")
from kernels import Mode, use_kernel_mapping  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"]
ALL_ON = dict(weight_bits=4, activation_bits=4, kv_bits=4, rotation_search="all")
_NORM_CALLS: list[int] = []


class CountingRMSNorm(nn.Module):
    """A 'hub' RMSNorm layer: the same arithmetic as transformers' Llama RMSNorm, plus a call counter."""

    def forward(self, hidden_states):  # noqa: ANN001, ANN201 - must match LlamaRMSNorm.forward exactly
        _NORM_CALLS.append(1)
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class FusedMLPBypassingQuantizers(nn.Module):
    """A 'hub' MLP that multiplies the raw weights (what a fused SwiGLU kernel does): it skips QATLinear."""

    def forward(self, x):  # noqa: ANN001, ANN201
        gate = F.linear(x, self.gate_proj.weight)
        up = F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class LocalRepo:
    """A kernel repository without the Hub: ``load()`` returns the layer class (kernels' RepositoryProtocol)."""

    def __init__(self, layer: type[nn.Module]) -> None:
        self.layer = layer

    def load(self) -> type[nn.Module]:
        return self.layer

    def __repr__(self) -> str:
        return f"LocalRepo({self.layer.__name__})"


def _cpu_mapping(name: str, layer: type[nn.Module]) -> dict:
    repo = LocalRepo(layer)
    return {name: {"cpu": {Mode.TRAINING: repo, Mode.INFERENCE: repo}}}


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(**ALL_ON), dtype=torch.float32, attn_implementation="sdpa", **kw
    )


@pytest.mark.parametrize("kind", FAMILIES)
def test_kernelizable_modules_of_each_family_hold_no_roste_code(tiny_checkpoints, kind):
    """What transformers 5.25 can kernelize in the supported families: RMSNorm, rotary, activations, never a
    module that is or contains a RoSTE linear / norm / attention module."""
    model = _load(tiny_checkpoints[kind], use_kernels=False)
    names = {type(m).kernel_layer_name for m in model.modules() if hasattr(type(m), "kernel_layer_name")}
    assert names <= {"RMSNorm", "SiLU", "GeLU", "GeluTanh", "NewGELU", "FastGELU", "QuickGELU"}, names
    for m in model.modules():
        if hasattr(type(m), "kernel_layer_name"):
            for sub in m.modules():
                assert type(sub).__module__.split(".")[0] != "hf_roste" and not hasattr(sub, "roste_attention")
    if kind == "gpt_neox":
        assert "RMSNorm" not in names  # its LayerNorms became hf_roste RMSNorms, which are not kernelizable


def test_kernelized_norm_runs_and_quantizers_still_apply(tiny_checkpoints, monkeypatch):
    import hf_roste.modules.qat_linear as ql

    reference = _load(tiny_checkpoints["llama"], use_kernels=False).train()
    model = _load(tiny_checkpoints["llama"], use_kernels=False).train()
    with use_kernel_mapping(_cpu_mapping("RMSNorm", CountingRMSNorm)):
        model.set_use_kernels(True, mode=Mode.TRAINING)
    assert model.use_kernels and not bypassing_kernels(model)
    assert "_kernel_repo" in model.model.norm.__dict__
    quantized = []
    real = ql.fake_quantize
    monkeypatch.setattr(ql, "fake_quantize", lambda x, spec: quantized.append(spec) or real(x, spec))
    ids = sample_ids(2, 10)
    _NORM_CALLS.clear()
    got = model(ids, labels=ids).loss
    n_with_kernels = len(quantized)
    quantized.clear()
    want = reference(ids, labels=ids).loss
    assert len(_NORM_CALLS) == 2 * model.config.num_hidden_layers + 1
    assert n_with_kernels == len(quantized) > 0
    assert torch.equal(got, want)


def test_kernel_that_bypasses_roste_is_refused_and_forwards_restored(tiny_checkpoints, monkeypatch):
    from transformers.models.llama import modeling_llama

    # make LlamaMLP kernelizable, as a custom kernel_config for a fused MLP would
    monkeypatch.setattr(modeling_llama.LlamaMLP, "kernel_layer_name", "LlamaMLP", raising=False)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "kernel_condition", staticmethod(lambda m: True), raising=False)
    model = _load(tiny_checkpoints["llama"], use_kernels=False).train()
    ids = sample_ids(2, 10)
    before = model(ids).logits
    with use_kernel_mapping(_cpu_mapping("LlamaMLP", FusedMLPBypassingQuantizers)):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(LlamaMLP -> LocalRepo") as err:
            model.set_use_kernels(True, mode=Mode.TRAINING)
    assert "use_kernels=False" in str(err.value)
    assert not model.use_kernels
    assert all("_kernel_repo" not in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, before)


def test_default_loading_on_cpu_keeps_pytorch_forwards(tiny_checkpoints):
    """from_pretrained kernelizes by default when `kernels` is installed; the default mapping has no CPU kernels."""
    model = _load(tiny_checkpoints["qwen3"])
    assert not bypassing_kernels(model)
    assert all("_kernel_repo" not in m.__dict__ for m in model.modules())
