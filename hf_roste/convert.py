"""Turning a transformers causal LM into a RoSTE QAT model (like transformers' `integrations/<method>.py`).

Load-time checks (`check_model_fits_config`), the module swap (`swap_linears`, packed skeletons),
`prepare_model` for a full-precision or master checkpoint and `finish_packed_model` for a packed
one. The state they attach (`model.roste`) is defined in :mod:`hf_roste.state`; switching per-layer
rotations afterwards is :func:`hf_roste.rotation.fusion.set_rotation_config`.
"""

from __future__ import annotations

import copy
import math

from torch import nn
from transformers.utils import logging

from .arch import ArchAdapter, get_adapter
from .config import PER_LAYER_ROTATIONS, SEARCH_ALGORITHMS, RoSTEConfig, validate_rotation_config
from .modules.attention import AttentionQuantState, install_attention
from .modules.kv_cache_wiring import install_generation_cache, install_kv_cache_hooks
from .modules.packed_linear import PackedLinear
from .modules.qat_linear import QATLinear
from .modules.shared_input import SharedInputQuant
from .numerics.hadamard import hadamard_factorization, hadamard_transform
from .rotation.fusion import (
    apply_r1,
    fold_norms,
    prepare_skeleton,
    r1_signs,
    set_rotation_config,
    untie_embeddings,
)
from .state import RoSTEState

logger = logging.get_logger(__name__)


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


def check_weight_group_size(model: nn.Module, adapter: ArchAdapter, config: RoSTEConfig) -> None:
    """`config.weight_group_size` must divide the input size of every linear RoSTE quantizes."""
    group = config.weight_group_size
    if group is None or config.weight_bits >= 16:
        return
    sizes = {path: model.get_submodule(path).in_features
             for path in adapter.quantized_linear_paths(model) if not _excluded(path, config)}
    bad = {path: n for path, n in sizes.items() if n % group}
    if not bad:
        return
    common = math.gcd(*sizes.values())
    fits = [g for g in (32, 64, 128, 256) if common % g == 0]
    shown = ", ".join(f"{path} (in_features={n})" for path, n in list(bad.items())[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    hint = f"e.g. {' or '.join(map(str, fits))}" if fits else f"any divisor of {common}"
    raise ValueError(
        f"RoSTEConfig.weight_group_size={group} does not divide the input size of {shown}{more}. The group size "
        f"must divide the input size of every quantized linear (their greatest common divisor is {common}): use a "
        f"group size dividing {common} ({hint}), weight_group_size=None for one scale per output channel, or list "
        "those modules in modules_to_not_convert."
    )


def check_r4_targets(model: nn.Module, adapter: ArchAdapter, config: RoSTEConfig) -> None:
    """R4 must not be switched on for a layer whose down projection is left unconverted.

    The online R4 rotates the down projection's input inside its RoSTE module, so a plain
    `nn.Linear` kept by `modules_to_not_convert` cannot carry it. (The adaptive search never
    switches it on there; an explicit `rotation_config` or `rotation_search="all"` would.)
    """
    if "R4" not in config.rotations:
        return
    flags = config.resolved_rotation_config(adapter.num_layers(model))["layers"]
    bad = [f"{adapter.layers}.{i}.{adapter.down_proj}" for i, f in enumerate(flags)
           if f.get("R4") and _excluded(f"{adapter.layers}.{i}.{adapter.down_proj}", config)]
    if bad:
        how = "rotation_config" if config.rotation_config is not None else f"rotation_search={config.rotation_search!r}"
        raise ValueError(
            f"R4 is switched on (by {how}) for {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}, which "
            "modules_to_not_convert keeps as a plain Linear: R4 rotates that module's input for its quantizer and "
            "needs the RoSTE module. Remove 'R4' from RoSTEConfig.rotations, set R4 off for those layers, use "
            "rotation_search='adaptive' (it leaves R4 off there), or quantize those modules."
        )


def check_norm_bias_readers(model: nn.Module, adapter: ArchAdapter) -> None:
    """A LayerNorm bias is folded into the biases of the linears reading that norm; they must have one."""
    if adapter.norm_kind != "layernorm":
        return
    missing = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for norm_path, readers in ((adapter.input_norm, adapter.qkv), (adapter.post_attention_norm, adapter.mlp_in)):
            if getattr(adapter.get(layer, norm_path), "bias", None) is None:
                continue
            missing += [f"{adapter.layers}.{i}.{p}" for p in readers if adapter.get(layer, p).bias is None]
    if missing:
        raise ValueError(
            f"{model.config.model_type}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} has no bias but "
            "reads a LayerNorm with a bias, which RoSTE folds into that linear's bias to make the norm rotation-"
            "invariant (e.g. GPT-NeoX with attention_bias=False). This layout is not supported: use a checkpoint "
            "whose attention / MLP input projections have biases (e.g. Pythia), or an RMSNorm family."
        )


def check_model_fits_config(model: nn.Module, config: RoSTEConfig, adapter: ArchAdapter | None = None) -> None:
    """Fail before any weight is read if `config` cannot be applied to `model` (works on a meta model)."""
    adapter = adapter or get_adapter(model)
    check_rotation_sizes(model, adapter, config)
    check_weight_group_size(model, adapter, config)
    check_r4_targets(model, adapter, config)
    check_norm_bias_readers(model, adapter)


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
    _share_input_quantization(model, adapter)
    return swapped


def _share_input_quantization(model: nn.Module, adapter: ArchAdapter) -> None:
    """Linears reading the same activation (q/k/v; gate/up) quantize it once (see `SharedInputQuant`)."""
    for layer in adapter.decoder_layers(model):
        for group in (adapter.qkv, adapter.mlp_in):
            mods = [adapter.get(layer, p) for p in group]
            mods = [m for m in mods if isinstance(m, (QATLinear, PackedLinear))]
            if len(mods) > 1:
                shared = SharedInputQuant()
                for m in mods:
                    m.shared_input = shared


def prepare_skeleton_for_checkpoint(model: nn.Module, config: RoSTEConfig, fmt: str = "master") -> None:
    """Make a (meta) model's module structure match a saved RoSTE checkpoint of format `fmt`."""
    adapter = get_adapter(model)
    if config.rotation_config is None:
        raise ValueError(
            "This RoSTE checkpoint's quantization_config has no rotation_config; hf_roste always writes it when "
            "saving. The config.json was edited or comes from another tool."
        )
    validate_rotation_config(config.rotation_config, adapter.num_layers(model))
    untie_embeddings(model, adapter)
    prepare_skeleton(model, adapter)
    if fmt == "packed" and config.weight_bits < 16:
        _swap_packed(model, adapter, config)
    else:
        swap_linears(model, adapter, config)


def _swap_packed(model: nn.Module, adapter: ArchAdapter, config: RoSTEConfig) -> None:
    for path in adapter.quantized_linear_paths(model):
        if _excluded(path, config):
            continue
        lin = model.get_submodule(path)
        packed = PackedLinear(
            lin.in_features, lin.out_features, config.weight_spec, config.activation_spec,
            bias=lin.bias is not None, bias_dtype=lin.weight.dtype, device=lin.weight.device,
        )
        adapter.set(model, path, packed)
    _share_input_quantization(model, adapter)


def finish_packed_model(model: nn.Module, config: RoSTEConfig) -> RoSTEState:
    """After loading a packed checkpoint: online R4 on down_proj inputs, R3 / K-V quantization in attention."""
    adapter = get_adapter(model)
    target = validate_rotation_config(config.rotation_config, adapter.num_layers(model))
    states = []
    attn_modules = []
    for layer, flags in zip(adapter.decoder_layers(model), target["layers"], strict=True):
        down = adapter.get(layer, adapter.down_proj)
        if flags["R4"]:
            if isinstance(down, PackedLinear):
                down.input_transform = hadamard_transform
            elif isinstance(down, QATLinear):
                down.input_hadamard = True
            else:
                raise ValueError(f"{adapter.down_proj} cannot apply R4 online ({type(down).__name__}).")
        attn_modules.append(adapter.get(layer, adapter.attn))
        states.append(AttentionQuantState(r3=flags["R3"], kv_spec=config.kv_spec))
    install_attention(model, attn_modules, states)
    install_kv_cache_hooks(attn_modules, adapter.attn_cache_kwarg)  # RoSTEQuantizedCache: K/V rotated + quantized by the cache
    install_generation_cache(model)  # generate() defaults to RoSTEQuantizedCache when kv_bits < 16
    state = RoSTEState(adapter=adapter, config=config, applied={"R1": target["R1"], "layers": copy.deepcopy(target["layers"])},
                       searched=target.get("strategy") != "default", attention_states=states, packed=True)
    model.roste = state
    return state


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
    check_model_fits_config(model, config, adapter)
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
    install_kv_cache_hooks(attn_modules, adapter.attn_cache_kwarg)  # RoSTEQuantizedCache: K/V rotated + quantized by the cache
    install_generation_cache(model)  # generate() defaults to RoSTEQuantizedCache when kv_bits < 16
    all_off = {"R1": target["R1"], "layers": [dict.fromkeys(PER_LAYER_ROTATIONS, False) for _ in range(num_layers)]}
    state = RoSTEState(adapter=adapter, config=config, applied=all_off, attention_states=states)
    model.roste = state
    if weights_are_rotated:
        _mark_applied(model, state, target)
    else:
        set_rotation_config(model, target, record=False)
    state.searched = config.rotation_config is not None and config.rotation_config.get("strategy") != "default"
    if config.rotation_search in SEARCH_ALGORITHMS and config.rotation_config is None:
        logger.info(
            f"RoSTE: rotation_search={config.rotation_search!r} and no rotation_config yet: R2/R3/R4 are off until "
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
