"""`model.dequantize()`: an ordinary full-precision transformers model from a RoSTE model.

What happens to each rotation (the result needs no hf_roste to load or run):
- R4 (online Hadamard on the down_proj input, full-size or block-diagonal) is folded back into down_proj:
  `W <- W R4^T`;
- R3 (online Hadamard on Q and K) is dropped: it cancels in `Q K^T` when K is not quantized;
- R2 stays fused in V and O (it has no online part);
- R1 stays fused for RMSNorm families (RMSNorm commutes with rotations). For LayerNorm families
  (GPT-NeoX) R1 is undone, norm scales are folded into the linears they feed, the RMSNorms
  become LayerNorms again (exact while the residual stream is zero-mean: exact for a freshly
  transformed model; after training, the mean component the training introduced is what differs)
  and the LM-head bias returns to the final norm's bias by least squares.

For a QAT model (master weights) the result computes what the QAT model computes with
quantization off. For a packed model the weights are the dequantized codes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.packed_fp4_linear import PackedFP4Linear
from ..modules.packed_linear import PackedLinear
from ..modules.qat_linear import QATLinear
from ..rotation.fusion import (
    _assign,
    _rot,
    r1_signs,
    rotate_input_side,
    rotate_output_side,
    rotate_r4_input_side,
)
from ..state import get_state


def _plain_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    if isinstance(module, (PackedLinear, PackedFP4Linear)):
        weight = module.dequantized_weight(torch.float32)
        bias = module.bias
    else:
        weight, bias = module.weight.detach(), module.bias
    lin = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.detach().to(dtype))
    return lin


@torch.no_grad()
def _restore_layernorms(model: nn.Module, adapter, signs: torch.Tensor | None, dtype: torch.dtype) -> None:
    """LayerNorm families: fold norm scales, rotate the stream back (if R1), LayerNorms again."""
    layers = adapter.decoder_layers(model)
    lm_head = adapter.get(model, adapter.lm_head)
    groups = []
    for layer in layers:
        groups.append((layer, adapter.input_norm, [adapter.get(layer, p) for p in adapter.qkv]))
        groups.append((layer, adapter.post_attention_norm, [adapter.get(layer, p) for p in adapter.mlp_in]))
    groups.append((model, adapter.final_norm, [lm_head]))
    for parent, path, readers in groups:
        norm = adapter.get(parent, path)
        gamma = norm.weight.to(torch.float64)
        for lin in readers:
            _assign(lin.weight, lin.weight.to(torch.float64) * gamma)
            if signs is not None:
                rotate_input_side(lin, signs, transpose=True)
        ln = nn.LayerNorm(norm.weight.shape[0], eps=norm.eps, device=norm.weight.device, dtype=dtype)
        adapter.set(parent, path, ln)
    if signs is not None:
        for layer in layers:
            for writer in adapter.residual_writers(layer):
                rotate_output_side(writer, signs, transpose=True)
        emb = adapter.get(model, adapter.embed)
        _assign(emb.weight, _rot(emb.weight, signs, transpose=True))
    if lm_head.bias is not None:
        # logits = LN(x) W^T + c  ==  (LN(x) + beta) W^T  with  W beta = c  (least squares; exact when c is in range(W))
        w = lm_head.weight.to(torch.float64)
        beta = torch.linalg.lstsq(w, lm_head.bias.to(torch.float64).unsqueeze(1)).solution.squeeze(1)
        _assign(adapter.get(model, adapter.final_norm).bias, beta)
        new_head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False, device=w.device, dtype=dtype)
        new_head.weight.data.copy_(lm_head.weight.detach().to(dtype))
        adapter.set(model, adapter.lm_head, new_head)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Turn a RoSTE model into an ordinary transformers model in place and return it."""
    state = get_state(model)
    adapter, config = state.adapter, state.config
    if isinstance(dtype, str):  # e.g. model.config.dtype, which save_pretrained turns into "float32"
        if dtype == "auto":
            dtype = None
        elif isinstance(getattr(torch, dtype, None), torch.dtype):
            dtype = getattr(torch, dtype)
        else:
            raise ValueError(f"dequantize(dtype={dtype!r}): not a torch dtype; use e.g. torch.float32 or 'bfloat16'.")
    dtype = dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        r4_on = state.applied["layers"][i]["R4"]
        for path in adapter.quantized_linear_paths(model):
            prefix = f"{adapter.layers}.{i}."
            if not path.startswith(prefix):
                continue
            module = model.get_submodule(path)
            if isinstance(module, (QATLinear, PackedLinear, PackedFP4Linear)):
                adapter.set(model, path, _plain_linear(module, dtype))
        if r4_on:
            rotate_r4_input_side(adapter.get(layer, adapter.down_proj), config.r4_block_size, transpose=True)
    for module in list(model.modules()):
        if hasattr(module, "roste_attention"):
            del module.roste_attention
    if adapter.norm_kind == "layernorm":
        hidden = adapter.get(model, adapter.embed).weight.shape[1]
        signs = r1_signs(hidden, config.rotation_seed) if state.applied["R1"] else None
        _restore_layernorms(model, adapter, signs, dtype)
    from ..modules.attention import base_attention_name

    base = base_attention_name(getattr(model.config, "_attn_implementation", None))
    model.config._attn_implementation = base
    model.to(dtype)
    del model.roste
    return model
