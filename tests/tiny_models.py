"""Tiny models of every supported family, built from configs (no download), for tests.

Norm scales and biases are randomised: with transformers' default init (ones / zeros) folding a
norm would be a no-op and a broken fold would go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from hf_roste.modules.kv_cache_wiring import output_cache  # noqa: F401 - re-exported for the tests

VOCAB = 128

TINY_CONFIGS = {
    # power-of-two sizes, GQA, untied
    "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256),
    # non-power-of-two hidden (96 = 12*8), head_dim 24 = 12*2, intermediate 160 = 20*8, MHA, tied
    "llama_npow2_tied": lambda: LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                            tie_word_embeddings=True, max_position_embeddings=256),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, vocab_size=VOCAB, sliding_window=8,
                                     max_position_embeddings=256),
    # Qwen2.5-like: q/k/v biases, GQA, tied embeddings, hidden 56*... uses 112 = 28*4, head_dim 28, inter 304 = 76*4
    "qwen2": lambda: Qwen2Config(hidden_size=112, intermediate_size=304, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
                                 max_position_embeddings=256),
    # Qwen3: q/k norms, head_dim set explicitly (32 != 64/4)
    "qwen3": lambda: Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, tie_word_embeddings=True,
                                 max_position_embeddings=256),
    # Pythia-like: LayerNorm with bias, parallel residual, partial rotary, fused qkv
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=VOCAB, rotary_pct=0.25,
                                      use_parallel_residual=True, max_position_embeddings=256),
    "gpt_neox_serial": lambda: GPTNeoXConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                             num_attention_heads=2, vocab_size=VOCAB, rotary_pct=0.5,
                                             use_parallel_residual=False, max_position_embeddings=256),
}


@torch.no_grad()
def randomise_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if "norm" in name or "layernorm" in name or "ln" in leaf[-2:][0]:
            if name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_tiny(kind: str, seed: int = 0, attn_implementation: str = "eager"):
    """A randomly initialised tiny model of `kind` (a key of TINY_CONFIGS), fp32."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    randomise_norms_and_biases(model, seed)
    model.eval()
    return model


def save_tiny(kind: str, directory: Path, seed: int = 0) -> Path:
    model = build_tiny(kind, seed)
    model.save_pretrained(directory)
    return directory


def sample_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _cache_kw() -> str:
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


# forward / generate() keyword of the KV cache: "cache" from transformers 5.24 ("past_key_values" before)
CACHE_KW = _cache_kw()
