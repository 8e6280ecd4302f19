"""Adapters of the supported families. Each is a few lines of data; see `ArchAdapter`."""

from __future__ import annotations

from .base import ArchAdapter

LLAMA_LIKE = ArchAdapter(
    name="llama-like",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    o_proj="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    up_proj="mlp.up_proj",
    down_proj="mlp.down_proj",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
    norm_kind="rms",
    head_dim_attr="head_dim",
    extra_notes=(
        "Qwen2: q/k/v biases rotate with their weights on the input side only (nothing to do).",
        "Qwen3: q_norm/k_norm act per head before RoPE, untouched by R1 (input side) and R3 (after RoPE).",
    ),
)

GPT_NEOX = ArchAdapter(
    name="gpt-neox",
    model_types=("gpt_neox",),
    embed="gpt_neox.embed_in",
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",
    attn="attention",
    qkv=("attention.query_key_value",),
    fused_qkv=True,
    o_proj="attention.dense",
    mlp_in=("mlp.dense_h_to_4h",),
    up_proj=None,
    down_proj="mlp.dense_4h_to_h",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
    norm_kind="layernorm",
    head_dim_attr="head_size",
    attn_cache_kwarg="layer_past",
    extra_notes=(
        "LayerNorm: the residual stream is made zero-mean, then LayerNorms become RMSNorms (exact).",
        "Parallel residual and partial rotary need nothing special: R3 acts on the whole head after RoPE.",
    ),
)

ADAPTERS: tuple[ArchAdapter, ...] = (LLAMA_LIKE, GPT_NEOX)
