"""Packed W4A4KV4 inference through the device path (issue 19).

The device-path tests run on CUDA when present (compiled kernels) and otherwise on the CPU with
``HF_ROSTE_TRITON=1``, the kernels going through Triton's interpreter (``TRITON_INTERPRET=1`` chosen
in conftest before triton is imported).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import output_cache
from transformers import AutoModelForCausalLM

from hf_roste import RoSTEConfig, get_state
from hf_roste.modules import packed_linear as packed_linear_module
from hf_roste.modules.kv_cache import RoSTEQuantizedCache, cache_bytes_per_token
from hf_roste.modules.kv_static_cache import RoSTEQuantizedStaticCache
from hf_roste.numerics import hadamard as hadamard_module
from hf_roste.numerics.kernels import kv_attention as kva
from hf_roste.numerics.kernels import packed_gemm as pg
from hf_roste.numerics.kernels import rotate_quant as rq

pytest.importorskip("triton")

SDPA = dict(attn_implementation="sdpa")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _train_tiny(path, steps: int = 40, **config) -> AutoModelForCausalLM:
    """A tiny Llama QA-trained for a few steps on a counting task (W4A4KV4, all rotations)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=RoSTEConfig(rotation_search="all", **config), dtype=torch.float32, **SDPA
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
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=DEVICE, **SDPA).eval()
    ids = _prompts(3, 9).to(DEVICE)
    monkeypatch.setenv("HF_ROSTE_TRITON", "0")
    with torch.no_grad():
        ref = model(ids).logits
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    # the online Hadamard's Triton kernel sums in another order (equal to fp32 rounding, tested in
    # tests/numerics/test_train_kernels.py), and so does the fused R4 + quantize kernel: keep R4 on the
    # PyTorch path so this compares the GEMM route alone
    monkeypatch.setattr(hadamard_module, "use_triton", lambda device: False)
    monkeypatch.setattr(packed_linear_module, "fused_r4_block", lambda transform, in_features: None)
    calls = []
    real = pg.packed_linear_triton
    monkeypatch.setattr(pg, "packed_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = model(ids).logits
    paths = get_state(model).adapter.quantized_linear_paths(model)
    assert len(calls) == len(paths)  # every packed linear went through the kernel
    assert torch.equal(got, ref)


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _down_projs(model) -> list:
    return [layer.mlp.down_proj for layer in model.model.layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_r4_route_equals_unfused_triton_route_bit_for_bit(trained, monkeypatch, dtype):
    """The down_projs' R4 (full size here: intermediate 128) fused with the activation quantizer gives the
    logits of the unfused Triton route (Triton Hadamard kernel, then the quantizer) bit for bit."""
    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=DEVICE, **SDPA).eval()
    assert all(d.input_transform is not None for d in _down_projs(model))  # R4 on every layer
    ids = _prompts(3, 9).to(DEVICE)
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    fused_calls = _count_calls(monkeypatch, rq, "rotate_quantize_activation_triton")
    with monkeypatch.context() as mp:
        mp.setattr(packed_linear_module, "fused_r4_block", lambda transform, in_features: None)
        with torch.no_grad():
            unfused = model(ids).logits
    assert not fused_calls
    for down in _down_projs(model):
        down._fused_r4_memo = None
    with torch.no_grad():
        fused = model(ids).logits
    assert len(fused_calls) == len(_down_projs(model))
    assert torch.equal(fused, unfused)


def test_block_r4_model_fused_route_generates_like_pytorch_route(tmp_path, tiny_checkpoints, monkeypatch):
    """A packed model with a block-diagonal R4 (r4_block_size=16): the Triton route, whose down_projs run the
    fused rotate + quantize kernel, gives the PyTorch route's greedy tokens."""
    _train_tiny(tiny_checkpoints["llama"], r4_block_size=16).save_pretrained(tmp_path / "packed")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", device_map=DEVICE, **SDPA).eval()
    assert get_state(model).config.r4_block_size == 16
    prompts = _prompts(4).to(DEVICE)
    monkeypatch.setenv("HF_ROSTE_TRITON", "0")
    ref = model.generate(prompts, max_new_tokens=8, do_sample=False)
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    fused_calls = _count_calls(monkeypatch, rq, "rotate_quantize_activation_triton")
    blocks = []
    real = rq.rotate_quantize_activation_triton
    monkeypatch.setattr(rq, "rotate_quantize_activation_triton",
                        lambda x, spec, block, **k: blocks.append(block) or real(x, spec, block, **k))
    got = model.generate(prompts, max_new_tokens=8, do_sample=False)
    assert len(fused_calls) == 2 * 8 and set(blocks) == {16}  # 2 layers x (prefill + 7 decode steps)
    assert torch.equal(got, ref)


def test_device_path_generation_equals_cpu_path(trained, monkeypatch):
    """Triton GEMMs + decode attention over the packed cache give the CPU path's greedy tokens."""
    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, device_map=DEVICE, **SDPA).eval()
    prompts = _prompts(4).to(DEVICE)
    monkeypatch.setenv("HF_ROSTE_TRITON", "0")
    ref = model.generate(prompts, max_new_tokens=8, do_sample=False)
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    calls = []
    real = kva.packed_kv_attention
    monkeypatch.setattr(kva, "packed_kv_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = model.generate(prompts, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert isinstance(output_cache(res), RoSTEQuantizedCache)
    assert len(calls) == 2 * 7  # 2 layers x 7 decode steps read the packed codes directly
    assert torch.equal(res.sequences, ref)


# --------------------------------------------------------------------------- trained model, 128 prompts
def _wide_tiny(path):
    """Tiny Llama with head_dim 64 (the KV format's fixed per-token cost is then <= 0.3x bf16)."""
    from tiny_models import randomise_norms_and_biases
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, vocab_size=128, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomise_norms_and_biases(model, 0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained_wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_infer_wide")
    model = _train_tiny(_wide_tiny(root / "base"), steps=60)
    model.save_pretrained(root / "packed")
    return model, root / "packed"


def _agreement(reference, candidate, prompts: torch.Tensor, new_tokens: int, tie_gap: float = 1e-4):
    """(identical sequences, ties, first divergences) of greedy generations of two models.

    A divergence is a tie when, at its first differing position, the reference's top-2 logits
    are within ``tie_gap`` (relative): rounding may then pick either token.
    """
    ref = reference.generate(prompts, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    got = candidate.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    start = prompts.shape[1]
    same = (ref.sequences == got).all(1)
    ties = 0
    for row in torch.nonzero(~same).flatten().tolist():
        pos = int(torch.nonzero(ref.sequences[row, start:] != got[row, start:])[0])
        top2 = ref.logits[pos][row].float().topk(2).values
        ties += bool((top2[0] - top2[1]).abs() <= tie_gap * top2.abs().max())
    return int(same.sum()), ties, ref


def _check_trained_model_on(device: str, trained_wide):
    qat, out = trained_wide
    qat = qat.to(device)
    packed = AutoModelForCausalLM.from_pretrained(out, device_map=device, **SDPA).eval()
    prompts = _prompts(128, seed=11).to(device)
    identical, ties, ref = _agreement(qat, packed, prompts, new_tokens=16)
    print(f"\n{device}: {identical}/128 greedy generations identical to the fake-quant model; "
          f"{ties} of the {128 - identical} divergences start at a top-2 tie")
    assert identical >= 0.99 * 128, (identical, ties)
    res = packed.generate(prompts[:4], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(res)
    assert isinstance(cache, RoSTEQuantizedCache)
    cfg = packed.config
    bf16_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    ratio = cache_bytes_per_token(cache) / bf16_per_token
    print(f"{device}: KV bytes per token {cache_bytes_per_token(cache):.0f} = {ratio:.3f}x bf16")
    assert ratio <= 0.3
    assert all(t.device.type == device for layer in cache.layers for t in layer._store.tensors())


def test_trained_model_reloads_to_the_same_generations_cpu(trained_wide):
    _check_trained_model_on("cpu", trained_wide)


@pytest.mark.cuda
def test_trained_model_reloads_to_the_same_generations_cuda(trained_wide):
    _check_trained_model_on("cuda", trained_wide)


# --------------------------------------------------------------------------- static shapes, compile, dtype
def test_static_cache_and_compile_equal_dynamic_eager(trained):
    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, **SDPA).eval()
    prompts = _prompts(2)
    dynamic = model.generate(prompts, max_new_tokens=6, do_sample=False)
    res = model.generate(prompts, max_new_tokens=6, do_sample=False, cache_implementation="static",
                         return_dict_in_generate=True)
    assert isinstance(output_cache(res), RoSTEQuantizedStaticCache)  # K/V stored as 4-bit codes, not fp32
    assert torch.equal(res.sequences, dynamic)
    torch._dynamo.reset()
    eager_forward = model.forward
    try:  # aot_eager traces every graph (Dynamo + AOTAutograd) without inductor's slow CPU codegen
        model.forward = torch.compile(eager_forward, backend="aot_eager")
        compiled = model.generate(prompts, max_new_tokens=6, do_sample=False, cache_implementation="static")
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()
    assert torch.equal(compiled, dynamic)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "auto"])
def test_unquantized_parts_load_in_requested_dtype(trained, tmp_path, dtype):
    qat, out = trained
    if dtype == "auto":  # "auto" follows the checkpoint: save one whose float parts are bf16
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, **SDPA).save_pretrained(tmp_path / "bf16")
        out = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **SDPA).eval()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight_scale.dtype == torch.float32 and q.weight_zero_point.dtype == torch.float32
    assert q.weight_packed.dtype == torch.uint8
    res = model.generate(_prompts(2), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    layer = output_cache(res).layers[0]
    assert layer._store.scale.dtype == torch.float32  # K/V scales keep the numerics' precision
    with torch.no_grad():
        logits = model(_prompts(2)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_device_path_decode_step_with_static_cache_is_one_graph(trained, monkeypatch):
    """The packed model's decode step on the Triton route with the static quantized cache: no graph break."""
    from tiny_models import CACHE_KW

    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, device_map=DEVICE, **SDPA).eval()
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    ids = _prompts(2, 5).to(DEVICE)
    cache = RoSTEQuantizedStaticCache(model, max_cache_len=8)
    with torch.no_grad():
        model(ids, **{CACHE_KW: cache}, use_cache=True)  # eager prefill: builds the per-layer layouts
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(model.forward)(ids[:, -1:], **{CACHE_KW: cache}, use_cache=True)
        finally:
            torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert int(cache.get_seq_length()) == 6


def test_compiled_device_path_equals_eager(trained, monkeypatch):
    """torch.compile traces the Triton route (custom ops, the layout built by an eager call)."""
    _, out = trained
    model = AutoModelForCausalLM.from_pretrained(out, device_map=DEVICE, **SDPA).eval()
    monkeypatch.setenv("HF_ROSTE_TRITON", "1")
    ids = _prompts(2, 5).to(DEVICE)
    with torch.no_grad():
        eager = model(ids).logits  # builds the per-layer layouts
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):  # runs the captured FX graphs as they are
        graphs.append(gm)
        return gm.forward

    try:
        with torch.no_grad():
            compiled = torch.compile(model.forward, backend=recording_backend)(ids).logits
    finally:
        torch._dynamo.reset()
    code = "\n".join(str(g.graph) for g in graphs)
    assert "packed_linear_w4" in code and "quantize_activation_w4" in code  # the kernels are in the graphs
    assert "rotate_quantize_activation_w4" in code  # the down_projs' fused R4 + quantize (full-size R4, 128)
    assert torch.equal(compiled, eager)
