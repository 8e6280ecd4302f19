"""Fusing rotations into weights: norm folding, R1 (residual), R2 (V/O per head), R4 (down_proj).

Conventions: activations are row vectors, a linear computes `y = x W^T + b` with `W` `[out, in]`.
A rotation `R` (orthonormal, `x -> x R`) is fused
- on the input side of a linear that reads a rotated tensor: `W <- W R`;
- on the output side of a linear whose output must be rotated: `W <- R^T W`, `b <- b R`.
All products are computed in float64 with the Hadamard transform itself (never a dense n x n
matrix), then cast back to the parameter's dtype. Each function keeps the full-precision function
of the model unchanged (tests check logits before and after).

Random signs: R1 uses `random_signs(hidden, seed)`, R2 of layer `i` uses
`random_signs(head_dim, seed + 1 + i)`. R3 and R4 are online transforms without signs (plain
Walsh-Hadamard, the matrix compressed-tensors and vLLM also use), so nothing but the config is
needed to rebuild every rotation.

`set_rotation_config` switches per-layer R2/R3/R4 on a prepared model by fusing only the differences
with what `model.roste` records as applied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..arch import ArchAdapter
from ..config import validate_rotation_config
from ..modules.norm import RMSNorm
from ..numerics.hadamard import hadamard_transform, random_signs
from ..state import get_state, unwrap_peft


def r1_signs(hidden_size: int, seed: int) -> torch.Tensor:
    """Random signs of R1 (`[hidden]`, float32 +-1)."""
    return random_signs(hidden_size, seed)


def r2_signs(head_dim: int, seed: int, layer_idx: int) -> torch.Tensor:
    """Random signs of layer `layer_idx`'s R2 (`[head_dim]`, float32 +-1)."""
    return random_signs(head_dim, seed + 1 + layer_idx)


def _rot(x: torch.Tensor, signs: torch.Tensor | None, transpose: bool = False) -> torch.Tensor:
    """`x @ R` (or `x @ R^T`) along the last dim, in float64."""
    s = None if signs is None else signs.to(device=x.device, dtype=torch.float64)
    return hadamard_transform(x.to(torch.float64), s, transpose=transpose)


@torch.no_grad()
def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(dtype=param.dtype, device=param.device))  # not .data: bumps the version counter


@torch.no_grad()
def rotate_input_side(linear: nn.Linear, signs: torch.Tensor | None, transpose: bool = False) -> None:
    """`W <- W R` (or `W R^T`): the linear now reads `x R` (or `x R^T`) and computes the same output."""
    _assign(linear.weight, _rot(linear.weight, signs, transpose))


@torch.no_grad()
def rotate_r4_input_side(linear: nn.Linear, block: int | None, transpose: bool = False) -> None:
    """`W <- W R4` (or `W R4^T`) with R4 full-size (`block` None) or block-diagonal (`RoSTEConfig.r4_block_size`)."""
    from ..numerics.block_hadamard import r4_transform

    if block is None:
        rotate_input_side(linear, None, transpose=transpose)
    else:
        _assign(linear.weight, r4_transform(linear.weight.to(torch.float64), block, transpose=transpose))


@torch.no_grad()
def rotate_output_side(linear: nn.Module, signs: torch.Tensor | None, transpose: bool = False) -> None:
    """`W <- R^T W`, `b <- b R` (or with `R^T`): the module's output becomes `y R`."""
    _assign(linear.weight, _rot(linear.weight.t(), signs, transpose).t())
    bias = getattr(linear, "bias", None)
    if bias is not None:
        _assign(bias, _rot(bias, signs, transpose))


@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, signs: torch.Tensor) -> None:
    """`E <- E R` (each token's vector rotated)."""
    _assign(embedding.weight, _rot(embedding.weight, signs))


# ----------------------------------------------------------------------------- norms
@torch.no_grad()
def _fold_norm_into(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Fold the norm's scale (and bias) into the linears that read its output; reset it to identity."""
    gamma = norm.weight.to(torch.float64)
    beta = getattr(norm, "bias", None)
    for lin in readers:
        w = lin.weight.to(torch.float64)
        if beta is not None:
            shift = w @ beta.to(torch.float64)
            if lin.bias is None:
                raise ValueError(
                    f"Cannot fold a norm bias into {type(lin).__name__} without bias; add a bias to the reader first."
                )
            _assign(lin.bias, lin.bias.to(torch.float64) + shift)
        _assign(lin.weight, w * gamma)
    norm.weight.data.fill_(1.0)
    if beta is not None:
        norm.bias.data.zero_()


def _ensure_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        return linear
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))
    return linear


@torch.no_grad()
def _center_output(module: nn.Module) -> None:
    """Make the module's output zero-mean over the hidden dim (rows of W, and b, minus their mean)."""
    w = module.weight.to(torch.float64)
    if isinstance(module, nn.Embedding):
        _assign(module.weight, w - w.mean(dim=1, keepdim=True))
        return
    _assign(module.weight, w - w.mean(dim=0, keepdim=True))
    if module.bias is not None:
        b = module.bias.to(torch.float64)
        _assign(module.bias, b - b.mean())


def _layernorm_to_rmsnorm(norm: nn.LayerNorm) -> RMSNorm:
    out = RMSNorm(norm.normalized_shape[0], eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    return out


def untie_embeddings(model: nn.Module, adapter: ArchAdapter) -> None:
    """Give the LM head its own weight (the final norm folds into it, not into the embedding)."""
    lm_head = adapter.get(model, adapter.lm_head)
    embed = adapter.get(model, adapter.embed)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for cfg in {id(c): c for c in (model.config, text_config)}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
    if lm_head.weight is embed.weight or lm_head.weight.data_ptr() == embed.weight.data_ptr():
        lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)


def prepare_skeleton(model: nn.Module, adapter: ArchAdapter) -> None:
    """Module changes that norm folding implies, without touching values.

    Used both before folding (full-precision input) and on the meta skeleton of a saved RoSTE
    checkpoint, so that both have the same state_dict keys: LayerNorms become `RMSNorm`, and for
    LayerNorm families the LM head gains a bias (the final norm's bias folds into it).
    """
    if adapter.norm_kind != "layernorm":
        return
    for layer in adapter.decoder_layers(model):
        for path in (adapter.input_norm, adapter.post_attention_norm):
            norm = adapter.get(layer, path)
            if isinstance(norm, nn.LayerNorm):
                adapter.set(layer, path, _layernorm_to_rmsnorm(norm))
    final = adapter.get(model, adapter.final_norm)
    if isinstance(final, nn.LayerNorm):
        adapter.set(model, adapter.final_norm, _layernorm_to_rmsnorm(final))
    _ensure_bias(adapter.get(model, adapter.lm_head))


@torch.no_grad()
def fold_norms(model: nn.Module, adapter: ArchAdapter) -> None:
    """Make every norm before a quantized block rotation-invariant (function unchanged).

    RMSNorm families: the norm scales fold into the linears they feed. LayerNorm families
    (GPT-NeoX): scales and biases fold into the readers, every writer to the residual stream (the
    embedding, o_proj, down_proj) is centred so the stream is zero-mean, and the LayerNorms become
    RMSNorms, which then compute exactly the same values.
    """
    layers = adapter.decoder_layers(model)
    lm_head = adapter.get(model, adapter.lm_head)
    final_norm = adapter.get(model, adapter.final_norm)
    if adapter.norm_kind == "layernorm":
        if getattr(final_norm, "bias", None) is not None:
            _ensure_bias(lm_head)
        _center_output(adapter.get(model, adapter.embed))
    for layer in layers:
        _fold_norm_into(adapter.get(layer, adapter.input_norm), [adapter.get(layer, p) for p in adapter.qkv])
        _fold_norm_into(adapter.get(layer, adapter.post_attention_norm), [adapter.get(layer, p) for p in adapter.mlp_in])
        if adapter.norm_kind == "layernorm":
            for writer in adapter.residual_writers(layer):
                _center_output(writer)
    _fold_norm_into(final_norm, [lm_head])
    prepare_skeleton(model, adapter)


# ----------------------------------------------------------------------------- R1
@torch.no_grad()
def apply_r1(model: nn.Module, adapter: ArchAdapter, signs: torch.Tensor) -> None:
    """Rotate the residual stream by R1 = diag(signs) H / sqrt(n). Norms must be folded first."""
    rotate_embedding(adapter.get(model, adapter.embed), signs)
    for layer in adapter.decoder_layers(model):
        for reader in adapter.residual_readers(layer):
            rotate_input_side(reader, signs)
        for writer in adapter.residual_writers(layer):
            rotate_output_side(writer, signs)
    rotate_input_side(adapter.get(model, adapter.lm_head), signs)


# ----------------------------------------------------------------------------- R2 / R4
@torch.no_grad()
def set_r2(model: nn.Module, adapter: ArchAdapter, layer_idx: int, signs: torch.Tensor, on: bool) -> None:
    """Fuse (on=True) or remove (on=False) R2 of one layer: V rows `R2^T W_v`, O columns `W_o R2`.

    Call it only to change the state: fusing twice applies R2 twice.
    """
    layer = adapter.decoder_layers(model)[layer_idx]
    _, kv_heads, head_dim = adapter.head_layout(model)
    v_path, rows = adapter.value_rows(model)
    v = adapter.get(layer, v_path)
    rows = rows.to(v.weight.device)
    w_v = v.weight.data[rows].to(torch.float64).view(-1, head_dim, v.in_features)
    # R^T W_v per head == (W_v^T R)^T along head_dim
    new = _rot(w_v.transpose(1, 2), signs, transpose=not on).transpose(1, 2).reshape(-1, v.in_features)
    v.weight[rows] = new.to(v.weight.dtype)
    if v.bias is not None:
        b = v.bias.data[rows].to(torch.float64).view(-1, head_dim)
        v.bias[rows] = _rot(b, signs, transpose=not on).reshape(-1).to(v.bias.dtype)
    o = adapter.get(layer, adapter.o_proj)
    w_o = o.weight.data.to(torch.float64).view(o.out_features, -1, head_dim)
    _assign(o.weight, _rot(w_o, signs, transpose=not on).reshape(o.out_features, -1))


@torch.no_grad()
def set_r4(model: nn.Module, adapter: ArchAdapter, layer_idx: int, on: bool) -> None:
    """Fuse (on) or remove (off) the transpose of the online R4 into down_proj and flip its online flag."""
    layer = adapter.decoder_layers(model)[layer_idx]
    down = adapter.get(layer, adapter.down_proj)
    current = bool(getattr(down, "input_hadamard", False))
    if current == on:
        return
    rotate_r4_input_side(down, getattr(down, "input_hadamard_block", None), transpose=not on)
    if hasattr(down, "input_hadamard"):
        down.input_hadamard = on
    elif on:
        raise TypeError(
            f"{adapter.down_proj} of layer {layer_idx} is a {type(down).__name__}, which cannot apply R4 online; "
            "convert it with the RoSTE quantizer first (or exclude R4 from RoSTEConfig.rotations)."
        )


@torch.no_grad()
def set_rotation_config(model: nn.Module, rotation_config: dict, record: bool = True) -> dict:
    """Switch per-layer R2/R3/R4 to `rotation_config`, keeping the full-precision function.

    Only the differences with what is fused now are applied. With `record=True` the
    configuration is also written to `model.config.quantization_config.rotation_config`.
    Returns the applied configuration.
    """
    state = get_state(model)
    model = unwrap_peft(model)
    if not isinstance(rotation_config, dict):
        raise TypeError(
            f"set_rotation_config needs a dict {{'R1': bool, 'layers': [{{'R2': bool, 'R3': bool, 'R4': bool}}, ...]}}, "
            f"got {type(rotation_config).__name__}."
        )
    if not isinstance(record, bool):
        raise TypeError(f"set_rotation_config(record=...) must be True or False, got {record!r}.")
    if state.packed:
        raise ValueError(
            "This model was loaded from a packed RoSTE checkpoint: its rotations are fused into integer codes and "
            "cannot be switched. Load the master checkpoint (or the full-precision model) to change rotations."
        )
    adapter = state.adapter
    num_layers = adapter.num_layers(model)
    target = validate_rotation_config(rotation_config, num_layers)
    if target["R1"] != state.applied["R1"]:
        raise ValueError(
            "rotation_config['R1'] cannot change after the model was prepared (R1 is fused into every weight); "
            f"the model has R1={state.applied['R1']}."
        )
    state.config._check_rotation_config_against_rotations(target)
    _, _, head_dim = adapter.head_layout(model)
    for i, (now, want) in enumerate(zip(state.applied["layers"], target["layers"], strict=True)):
        if now["R2"] != want["R2"]:
            set_r2(model, adapter, i, r2_signs(head_dim, state.config.rotation_seed, i), on=want["R2"])
        if now["R4"] != want["R4"]:
            set_r4(model, adapter, i, on=want["R4"])
        state.attention_states[i].r3 = want["R3"]
    state.applied = {"R1": target["R1"], "layers": copy.deepcopy(target["layers"])}
    if record:
        state.config.rotation_config = target
        state.searched = True
    return state.applied
