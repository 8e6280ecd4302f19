"""GGUF export (issue 20): read back with gguf's reader, dequantize with gguf's reference dequantizer.

Quantized tensors must equal the packed RoSTE model's dequantized weights bit for bit (Q4_0/Q8_0),
everything else the fp32 tensors within F16 rounding; names, shapes and the Llama Q/K row order are
those of llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from hf_roste import RoSTEConfig, get_state
from hf_roste.cli import main as cli_main
from hf_roste.demo.tasks import char_tokenizer
from hf_roste.export.gguf import GGUFExportError, check_gguf_exportable, export_gguf
from hf_roste.modules.packed_linear import PackedLinear

CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
    "mistral": lambda: MistralConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, vocab_size=128,
                                     sliding_window=None, max_position_embeddings=256),
    "qwen2": lambda: Qwen2Config(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
                                 max_position_embeddings=256),
}
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _base(kind: str, root):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / "base")
    tok = char_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(root / "base")
    return root / "base", tok


def _packed(path, root, tok, **cfg):
    qc = RoSTEConfig(**cfg) if cfg else RoSTEConfig.for_target("llama.cpp-q4_0")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.float32).eval()
    model.save_pretrained(root / "roste")
    tok.save_pretrained(root / "roste")
    return AutoModelForCausalLM.from_pretrained(root / "roste").eval(), root / "roste"


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gguf_{request.param}")
    base, tok = _base(request.param, root)
    packed, folder = _packed(base, root, tok)
    assert cli_main(["export", str(folder), str(root / "model.gguf"), "--format", "gguf"]) == 0
    return request.param, packed, gguf.GGUFReader(root / "model.gguf")


def _llama_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute, written out independently
    out = torch.empty_like(t)
    head_dim = t.shape[0] // n_head
    half = head_dim // 2
    for h in range(n_head):
        for i in range(half):
            out[h * head_dim + 2 * i] = t[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = t[h * head_dim + half + i]
    return out


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def _expected_names(kind: str, n_layers: int) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    per = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    for i in range(n_layers):
        names |= {f"blk.{i}.{p}.weight" for p in per}
        if kind == "qwen2":
            names |= {f"blk.{i}.{p}.bias" for p in ("attn_q", "attn_k", "attn_v")}
    return names


def test_names_shapes_and_types(exported):
    kind, packed, reader = exported
    tensors = _tensors(reader)
    cfg = packed.config
    assert set(tensors) == _expected_names(kind, cfg.num_hidden_layers)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shapes = {"attn_q": (cfg.hidden_size, cfg.num_attention_heads * head_dim),
              "attn_k": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
              "ffn_down": (cfg.intermediate_size, cfg.hidden_size), "ffn_up": (cfg.hidden_size, cfg.intermediate_size)}
    for name, t in tensors.items():
        leaf = name.split(".")[-2]
        if name.startswith("blk.") and name.endswith(".weight") and "norm" not in leaf:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        if leaf in shapes and name.endswith(".weight"):
            assert tuple(int(x) for x in t.shape) == shapes[leaf], name  # ggml order: [in, out]
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[-1]).decode() == ("qwen2" if kind == "qwen2" else "llama")


def test_quantized_tensors_equal_the_packed_model_bit_for_bit(exported):
    kind, packed, reader = exported
    tensors = _tensors(reader)
    state = get_state(packed)
    adapter = state.adapter
    n_head, n_kv, _ = adapter.head_layout(packed)
    checked = 0
    for i, layer in enumerate(adapter.decoder_layers(packed)):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")):
            module = layer.get_submodule(hf)
            assert isinstance(module, PackedLinear)
            ours = module.dequantized_weight(torch.float32)
            bias = module.bias
            if kind != "qwen2" and gg in ("attn_q", "attn_k"):
                heads = n_head if gg == "attn_q" else n_kv
                ours = _llama_permute(ours, heads)
                bias = None if bias is None else _llama_permute(bias.detach(), heads)
            t = tensors[f"blk.{i}.{gg}.weight"]
            theirs = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float32))
            assert torch.equal(theirs.reshape(ours.shape), ours), (i, gg)
            if bias is not None:
                b = tensors[f"blk.{i}.{gg}.bias"]
                assert torch.equal(torch.from_numpy(np.array(b.data, dtype=np.float32)), bias.float())
            checked += 1
    assert checked == 7 * len(adapter.decoder_layers(packed))


def test_unquantized_tensors_within_f16_rounding(exported):
    kind, packed, reader = exported
    tensors = _tensors(reader)
    sd = packed.state_dict()
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "blk.1.ffn_norm.weight": "model.layers.1.post_attention_layernorm.weight"}
    for gg, hf in pairs.items():
        t = tensors[gg]
        theirs = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(sd[hf].shape)
        ref = sd[hf].float()
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            assert torch.equal(theirs, ref.half().float()), gg
            assert torch.allclose(theirs, ref, rtol=2**-11, atol=2**-24), gg
        else:
            assert torch.equal(theirs, ref), gg


def test_llama_row_permutation_matches_llama_cpp_rope():
    """HF rotate-half RoPE on HF rows == llama.cpp's pairwise RoPE on the permuted rows (same q.k)."""
    torch.manual_seed(0)
    n_head, head_dim, pos = 2, 8, 5
    q = torch.randn(n_head * head_dim, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = pos * inv

    def hf_rope(x):
        x = x.view(n_head, head_dim)
        x1, x2 = x[:, : head_dim // 2], x[:, head_dim // 2:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1).reshape(-1)

    def ggml_rope(x):  # llama.cpp "normal" mode: consecutive pairs
        x = x.view(n_head, head_dim // 2, 2)
        a, b = x[..., 0], x[..., 1]
        return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).reshape(-1)

    assert torch.allclose(_llama_permute(hf_rope(q), n_head), ggml_rope(_llama_permute(q, n_head)))


def test_metadata_and_tokenizer(exported):
    kind, packed, reader = exported
    f = reader.fields
    prefix = "qwen2" if kind == "qwen2" else "llama"

    def scalar(key):
        return f[key].parts[f[key].data[0]][0]

    assert int(scalar(f"{prefix}.block_count")) == packed.config.num_hidden_layers
    assert int(scalar(f"{prefix}.attention.head_count_kv")) == packed.config.num_key_value_heads
    assert math.isclose(float(scalar(f"{prefix}.attention.layer_norm_rms_epsilon")), packed.config.rms_norm_eps,
                        rel_tol=1e-6)
    assert int(scalar("general.file_type")) == gguf.LlamaFileType.MOSTLY_Q4_0
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    assert len(tokens) == 128 and tokens[:3] == ["<pad>", "<eos>", "<bos>"]
    assert tokens[4] == "Ġ" and tokens[69] == "a"  # space as its GPT-2 byte symbol, letters as themselves
    assert int(scalar("tokenizer.ggml.eos_token_id")) == 1
    assert bool(scalar("tokenizer.ggml.add_bos_token")) is False  # the char tokenizer adds no BOS
    assert bytes(f["tokenizer.chat_template"].parts[-1]).decode() == CHAT


def test_q8_0_from_8bit_codes(tmp_path):
    base, tok = _base("llama", tmp_path)
    cfg = dict(weight_bits=8, weight_symmetric=True, weight_group_size=32, weight_scale_dtype="float16",
               activation_bits=16, kv_bits=16, rotations=("R1", "R2"), rotation_search="all")
    packed, folder = _packed(base, tmp_path, tok, **cfg)
    export_gguf(folder, tmp_path / "q8.gguf")
    t = _tensors(gguf.GGUFReader(tmp_path / "q8.gguf"))["blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    ours = packed.model.layers[1].mlp.down_proj.dequantized_weight(torch.float32)
    assert torch.equal(torch.from_numpy(gguf_dequantize(t.data, t.tensor_type)).reshape(ours.shape), ours)


@pytest.mark.parametrize("cfg, needle", [
    (dict(rotations=("R1", "R2", "R4")), "online R4"),
    (dict(weight_symmetric=False), "asymmetric weights"),
    (dict(weight_group_size=128), "weight_group_size=128"),
    (dict(weight_scale_dtype="float32"), "weight_scale_dtype='float32'"),
    (dict(activation_bits=8), "activation_bits=8"),
])
def test_refusals_name_the_target(cfg, needle):
    base = dict(RoSTEConfig.for_target("llama.cpp-q4_0").to_dict())
    for k in ("quant_method", "format_version", "checkpoint_format", "target"):
        base.pop(k)
    problems = check_gguf_exportable(RoSTEConfig(**{**base, **cfg}))
    assert len(problems) == 1 and needle in problems[0] and "llama.cpp-q4_0" in problems[0], problems


def test_export_refuses_a_model_with_online_r4(tmp_path):
    base, tok = _base("llama", tmp_path)
    qc = RoSTEConfig.for_target("vllm-w4a16-r4", weight_group_size=32, r4_block_size=32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc).eval()
    with pytest.raises(GGUFExportError, match="online R4"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=tok)
    assert cli_main(["export", str(tmp_path / "nope"), str(tmp_path / "x.gguf"), "--format", "gguf"]) != 0
