"""Packed W4A4KV4 inference through the device path (issue 19), tested on CPU.

The Triton kernels run through Triton's interpreter here (``HF_ROSTE_TRITON=1``, ``TRITON_INTERPRET=1``
chosen in conftest before triton is imported); on a CUDA machine the ``cuda`` tests run them compiled.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import output_cache
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state
from hf_roste.numerics.kernels import packed_gemm as pg
from hf_roste.modules.kv_cache import RoSTEQuantizedCache, cache_bytes_per_token

pytest.importorskip("triton")

SDPA = dict(attn_implementation="sdpa")


def _train_tiny(path, steps: int = 40) -> AutoModelForCausalLM:
    """A tiny Llama QA-trained for a few steps on a counting task (W4A4KV4, all rotations)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(rotation_search="all"), dtype=torch.float32, **SDPA
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        start = torch.randint(0, 100, (8, 1), generator=g)
        ids = (start + torch.arange(24)) % 128
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoints):
    model = _train_tiny(tiny_checkpoints["llama"])
    out = tmp_path_factory.mktemp("gpu_infer") / "packed"
    model.save_pretrained(out)
    return model, out


def _prompts(n: int, length: int = 6, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 100, (n, 1), generator=g) + torch.arange(length)) % 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_route_equals_pytorch_route_bit_for_bit(trained, monkeypatch, dtype):
    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **SDPA).eval()
    ids = _prompts(3, 9)
    monkeypatch.setenv("HF_ROSTE_TRITON", "0")
    with torch.no_grad():
        ref = model(ids).logits
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    calls = []
    real = pg.packed_linear_triton
    monkeypatch.setattr(pg, "packed_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = model(ids).logits
    paths = get_state(model).adapter.quantized_linear_paths(model)
    assert len(calls) == len(paths)  # every packed linear went through the kernel
    assert torch.equal(got, ref)
