"""Turning a transformers causal LM into a RoSTE QAT model, and switching per-layer rotations.

`RoSTEState` (attached as `model.roste`) records what is fused into the weights right now, so
switching a rotation on or off (the search, re-searching mid-training) always keeps the
full-precision function of the model unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from ..arch import ArchAdapter, get_adapter
from ..config import PER_LAYER_ROTATIONS, RoSTEConfig
from ..modules.attention import AttentionQuantState, install_attention
from ..modules.qat_linear import QATLinear
from .fusion import apply_r1, fold_norms, prepare_skeleton, r1_signs, r2_signs, set_r2, set_r4, untie_embeddings
from .hadamard import hadamard_factorization

logger = logging.get_logger(__name__)


@dataclass
class RoSTEState:
    """What hf_roste knows about a prepared model (attribute `model.roste`; not saved as tensors).

    Attributes:
        adapter: the family adapter.
        config: the model's `RoSTEConfig` (the same object as `model.config.quantization_config`).
        applied: the explicit rotation configuration fused into the weights right now.
        searched: True once a search (or a saved/explicit configuration) decided the flags.
    """

    adapter: ArchAdapter
    config: RoSTEConfig
    applied: dict
    searched: bool = False
    attention_states: list[AttentionQuantState] = field(default_factory=list)


def get_state(model: nn.Module) -> RoSTEState:
    """The RoSTE state of a prepared model; a clear error for a model that was not prepared."""
    base = getattr(model, "get_base_model", None)
    candidates = [model] + ([base()] if callable(base) else [])
    for m in candidates:
        state = getattr(m, "roste", None)
        if isinstance(state, RoSTEState):
            return state
    raise ValueError(
        f"{type(model).__name__} was not prepared for RoSTE. Load it with "
        "`AutoModelForCausalLM.from_pretrained(path, quantization_config=RoSTEConfig(...))` first."
    )


def check_rotation_sizes(model: nn.Module, adapter: ArchAdapter, config: RoSTEConfig) -> None:
    """Every rotation allowed by `config.rotations` needs a Hadamard construction of its size."""
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _, _, head_dim = adapter.head_layout(model)
    down = adapter.get(adapter.decoder_layers(model)[0], adapter.down_proj)
    sizes = {
        "R1": ("hidden_size", text_cfg.hidden_size),
        "R2": ("head_dim", head_dim),
        "R3": ("head_dim", head_dim),
        "R4": ("intermediate_size", down.in_features),
    }
    for name in config.rotations:
        what, n = sizes[name]
        try:
            hadamard_factorization(n)
        except ValueError as exc:
            raise ValueError(
                f"{name} needs a Hadamard matrix of order {what}={n}, which has no construction here: {exc} "
                f"Remove {name!r} from RoSTEConfig.rotations to use this model without it."
            ) from exc


def _excluded(path: str, config: RoSTEConfig) -> bool:
    skip = config.modules_to_not_convert or []
    return any(path == s or path.endswith("." + s) or f".{s}." in f".{path}." for s in skip)


def swap_linears(model: nn.Module, adapter: ArchAdapter, config: RoSTEConfig) -> list[str]:
    """Replace every quantized block linear by a `QATLinear` sharing its parameters."""
    swapped = []
    for path in adapter.quantized_linear_paths(model):
        if _excluded(path, config):
            continue
        lin = model.get_submodule(path)
        if isinstance(lin, QATLinear):
            swapped.append(path)
            continue
        if type(lin) is not nn.Linear:
            raise TypeError(f"{path} is a {type(lin).__name__}; RoSTE expects a plain nn.Linear there.")
        adapter.set(model, path, QATLinear.from_linear(lin, config.weight_spec, config.activation_spec))
        swapped.append(path)
    return swapped


def prepare_skeleton_for_checkpoint(model: nn.Module, config: RoSTEConfig) -> None:
    """Make a (meta) model's module structure match a saved RoSTE master checkpoint."""
    adapter = get_adapter(model)
    untie_embeddings(model, adapter)
    prepare_skeleton(model, adapter)
    swap_linears(model, adapter, config)


def prepare_model(model: nn.Module, config: RoSTEConfig, *, weights_are_rotated: bool) -> RoSTEState:
    """Make `model` a RoSTE QAT model in place.

    Args:
        model: a loaded transformers causal LM of a supported family.
        config: its `RoSTEConfig`.
        weights_are_rotated: False for a full-precision checkpoint (norms are folded and R1, R2,
            R4 fused here); True for a saved RoSTE master checkpoint, whose weights already hold
            `config.rotation_config` (only the online flags are set).
    """
    adapter = get_adapter(model)
    check_rotation_sizes(model, adapter, config)
    num_layers = adapter.num_layers(model)
    target = config.resolved_rotation_config(num_layers)
    if not weights_are_rotated:
        untie_embeddings(model, adapter)
        fold_norms(model, adapter)
        if target["R1"]:
            hidden = adapter.get(model, adapter.embed).weight.shape[1]
            apply_r1(model, adapter, r1_signs(hidden, config.rotation_seed))
    swap_linears(model, adapter, config)
    states = []
    attn_modules = []
    for layer in adapter.decoder_layers(model):
        attn_modules.append(adapter.get(layer, adapter.attn))
        states.append(AttentionQuantState(r3=False, kv_spec=config.kv_spec))
    install_attention(model, attn_modules, states)
    all_off = {"R1": target["R1"], "layers": [dict.fromkeys(PER_LAYER_ROTATIONS, False) for _ in range(num_layers)]}
    state = RoSTEState(adapter=adapter, config=config, applied=all_off, attention_states=states)
    model.roste = state
    if weights_are_rotated:
        _mark_applied(model, state, target)
    else:
        set_rotation_config(model, target, record=False)
    state.searched = config.rotation_config is not None
    if config.rotation_search == "adaptive" and config.rotation_config is None:
        logger.info(
            "RoSTE: rotation_search='adaptive' and no rotation_config yet: R2/R3/R4 are off until "
            "search_rotation_config (or RoSTESFTTrainer) runs the search."
        )
    return state


def _mark_applied(model: nn.Module, state: RoSTEState, target: dict) -> None:
    """Set online flags to `target` for weights that already hold it."""
    layers = state.adapter.decoder_layers(model)
    for i, flags in enumerate(target["layers"]):
        down = state.adapter.get(layers[i], state.adapter.down_proj)
        if hasattr(down, "input_hadamard"):
            down.input_hadamard = flags["R4"]
        state.attention_states[i].r3 = flags["R3"]
    state.applied = {"R1": target["R1"], "layers": copy.deepcopy(target["layers"])}


@torch.no_grad()
def set_rotation_config(model: nn.Module, rotation_config: dict, record: bool = True) -> dict:
    """Switch per-layer R2/R3/R4 to `rotation_config`, keeping the full-precision function.

    Only the differences with what is fused now are applied. With `record=True` the
    configuration is also written to `model.config.quantization_config.rotation_config`.
    Returns the applied configuration.
    """
    from ..config import validate_rotation_config

    state = get_state(model)
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


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every RoSTE fake quantizer (weights, activations, K/V) on or off; rotations stay."""
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.quant_enabled = enabled
    for st in get_state(model).attention_states:
        st.quant_enabled = enabled
