"""Attention-side RoSTE work (R3 and K/V fake quantization) without touching modeling code.

transformers' attention modules (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX) apply RoPE, update the
cache, then call the function registered under `config._attn_implementation`. We register
`roste_<base>` wrappers (and the matching mask functions) that, per attention module:

1. apply the online Hadamard R3 to Q and K (after RoPE) when the layer's R3 flag is on;
2. fake-quantize K and V per token per head (after RoPE and R3),

then call the base implementation (`eager` = the model's own eager function, or `sdpa`, flash,
...). With a `DynamicCache` the wrapper sees the whole cached K/V at every step; per-token
quantization of the full cache gives exactly the values of quantizing each token once, so
training (no cache) and generation (with cache) compute the same thing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..numerics import QuantSpec, fake_quantize
from ..numerics.hadamard import hadamard_transform

PREFIX = "roste_"

Observer = Callable[[str, torch.Tensor], None]


@dataclass
class AttentionQuantState:
    """Per-attention-module RoSTE state (a plain attribute: never in the state_dict).

    Attributes:
        r3: apply the online Hadamard to Q and K after RoPE.
        kv_spec: quantizer of K and V `[batch, kv_heads, seq, head_dim]` (per token per head).
        quant_enabled: False turns K/V quantization off (R3 still applies: it is part of the function).
        observers: callables `(name, tensor)` receiving "k" and "v" after R3, before quantization
            (used by the rotation search).
        kv_quantized_by_cache: set while a quantized KV cache has already rotated and quantized K/V.
        observe_query: also pass "q" (after RoPE and R3) to the observers, before "k" and "v"
            (the rotation search's "output" criterion needs the attention scores).
    """

    r3: bool
    kv_spec: QuantSpec
    quant_enabled: bool = True
    observers: list[Observer] = field(default_factory=list)
    kv_quantized_by_cache: bool = False
    observe_query: bool = False


def _base_function(base: str, module: nn.Module) -> Callable:
    if base == "eager":
        modeling = sys.modules[type(module).__module__]
        fn = getattr(modeling, "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward in {modeling.__name__}.")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def transform_qkv(
    state: AttentionQuantState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply R3 to Q/K and fake-quantize K/V as the layer's state says. Shapes `[b, heads, seq, head_dim]`."""
    if state.kv_quantized_by_cache:
        return (hadamard_transform(query) if state.r3 else query), key, value
    if state.r3:
        query = hadamard_transform(query)
        key = hadamard_transform(key)
    for obs in state.observers:
        if state.observe_query:
            obs("q", query)
        obs("k", key)
        obs("v", value)
    if state.quant_enabled and state.kv_spec.enabled:
        key = fake_quantize(key, state.kv_spec)
        value = fake_quantize(value, state.kv_spec)
    return query, key, value


def _make_wrapper(base: str) -> Callable:
    def roste_attention_forward(module, query, key, value, attention_mask, **kwargs):
        state: AttentionQuantState | None = getattr(module, "roste_attention", None)
        if state is not None:
            query, key, value = transform_qkv(state, query, key, value)
        return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    roste_attention_forward.__name__ = f"roste_{base}_attention_forward"
    return roste_attention_forward


def register_attention(base: str) -> str:
    """Register (once) and return the name of the RoSTE wrapper around attention `base`."""
    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"Attention implementation {base!r} is not registered in transformers; RoSTE wraps one of "
                f"'eager', {', '.join(repr(k) for k in ALL_ATTENTION_FUNCTIONS.keys())}."
            )
        AttentionInterface.register(name, _make_wrapper(base))
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[base] if base in ALL_MASK_ATTENTION_FUNCTIONS else None
        if mask_fn is not None:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
    return name


def base_attention_name(name: str | None) -> str:
    """`roste_sdpa` -> `sdpa`; other names unchanged (None -> "eager")."""
    if name is None:
        return "eager"
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def install_attention(model: nn.Module, attn_modules: list[nn.Module], states: list[AttentionQuantState]) -> None:
    """Switch `model` to the RoSTE attention wrapper and attach one state per attention module."""
    config = model.config
    base = base_attention_name(getattr(config, "_attn_implementation", None))
    name = register_attention(base)
    for cfg in {id(c): c for c in _configs_of(model)}.values():
        cfg._attn_implementation = name
    for module, state in zip(attn_modules, states, strict=True):
        module.roste_attention = state


def _configs_of(model: nn.Module):
    seen = [model.config]
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.append(cfg)
    return seen
