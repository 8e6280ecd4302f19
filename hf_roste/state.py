"""What hf_roste knows about a prepared model: `RoSTEState` (attribute `model.roste`) and what reads it.

`RoSTEState` records what is fused into the weights right now, so switching a rotation on or off
(the search, re-searching mid-training) always keeps the full-precision function of the model
unchanged. This module sits below `modules/` (the KV cache reads the attention states from here)
and depends only on `arch/` and `config.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .arch import ArchAdapter
from .config import RoSTEConfig

if TYPE_CHECKING:
    from .modules.attention import AttentionQuantState


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
    packed: bool = False
    save_format: str = "packed"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (the model itself otherwise)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def trained_lora_modules(model: nn.Module) -> list[str]:
    """Names of LoRA `B` matrices that are not all zero (a trained, not freshly initialised, adapter)."""
    return [name for name, p in model.named_parameters() if ".lora_B." in f".{name}" and bool(p.detach().any())]


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


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every RoSTE fake quantizer (weights, activations, K/V) on or off; rotations stay."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_quantization_enabled(model, enabled): enabled must be True or False, got {enabled!r}.")
    if get_state(model).packed:
        raise ValueError(
            "A packed RoSTE model computes with integer codes; quantization cannot be turned off. "
            "Use model.dequantize() for a full-precision copy."
        )
    for module in model.modules():
        # QATLinear keeps its switch as an instance attribute (PEFT wrappers forward attribute reads to
        # their base layer, so look in the instance dict, not with getattr)
        if isinstance(vars(module).get("quant_enabled"), bool):
            module.quant_enabled = enabled
    for st in get_state(model).attention_states:
        st.quant_enabled = enabled


class save_format:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Choose what `save_pretrained` writes for a RoSTE model: `"packed"` (default) or `"master"`.

    Example::

        with hf_roste.save_format(model, "master"):
            model.save_pretrained("ckpt")      # full-precision master weights, to resume training
    """

    def __init__(self, model: nn.Module, fmt: str) -> None:
        if fmt not in ("packed", "master"):
            raise ValueError(f"save_format must be 'packed' or 'master', got {fmt!r}.")
        self.state = get_state(model)
        if self.state.packed and fmt == "master":
            raise ValueError("A model loaded from a packed checkpoint has no master weights to save.")
        self.fmt = fmt
        self.previous = self.state.save_format

    def __enter__(self) -> save_format:
        self.state.save_format = self.fmt
        return self

    def __exit__(self, *exc) -> None:
        self.state.save_format = self.previous
