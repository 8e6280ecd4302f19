"""Outlier statistics at the inputs of the quantized linears, before and after rotation.

For a model and a list of token sequences, the input of `q_proj` (= the k/v input), `o_proj`,
`gate_proj` (= the `up_proj` input) and `down_proj` of every decoder layer is recorded, and per token t
the ratio r_t = max_i |x_ti| / median_i |x_ti| over the channels. A per-token quantizer spends its
range on the largest channel, so a large r_t means the typical channel gets few quantization levels.

- *before*: the plain full-precision model, i.e. what round-to-nearest quantizes;
- *after*: the same checkpoint loaded with `RoSTEConfig(rotation_search="all")` (norms folded, R1 fused,
  R2 fused into v/o, online R4 on the `down_proj` input) with quantization switched off, i.e. the tensor
  the per-token quantizer sees once every rotation is on.

Reported per layer and module: the median of r_t over tokens ("typical") and its maximum ("worst").
`bench/outliers.py` measures the same statistic on the bench's calibration text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

MODULES = ("q_proj", "o_proj", "gate_proj", "down_proj")


def token_ratios(x: torch.Tensor) -> torch.Tensor:
    """Per token (all leading dimensions flattened): max |x| / median |x| over the last dimension."""
    a = x.detach().float().abs().reshape(-1, x.shape[-1])
    return a.amax(-1) / a.median(-1).values.clamp_min(1e-12)


@torch.no_grad()
def collect_ratios(model, sequences: Sequence[torch.Tensor], rotated: bool) -> dict[str, dict[str, float]]:
    """`{"<layer>.<module>": {"median", "max", "tokens"}}` of r_t over every token of `sequences`.

    With `rotated=True` a module with the online Hadamard (`input_hadamard`) has it applied first, as
    its quantizer would see the input. Each sequence is a `(1, T)` id tensor without padding.
    """
    from ..numerics.block_hadamard import r4_transform

    store: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        for name in MODULES:
            parent = layer.self_attn if name in ("q_proj", "o_proj") else layer.mlp
            key = f"{li}.{name}"

            def hook(module, args, key=key):
                x = args[0]
                if rotated and getattr(module, "input_hadamard", False):
                    x = r4_transform(x, getattr(module, "input_hadamard_block", None))
                store.setdefault(key, []).append(token_ratios(x))

            hooks.append(getattr(parent, name).register_forward_pre_hook(hook))
    model.eval()
    try:
        for ids in sequences:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, ratios in store.items():
        r = torch.cat(ratios)
        out[key] = {"median": float(r.median()), "max": float(r.max()), "tokens": int(r.numel())}
    return out


def outlier_table(path: str | Path, sequences: Sequence[torch.Tensor]) -> list[dict]:
    """Per layer: `{"layer": i, "<module>": {"before": stats, "after": stats}}` for the checkpoint at `path`."""
    from transformers import AutoModelForCausalLM

    from ..config import RoSTEConfig
    from ..state import set_quantization_enabled

    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    before = collect_ratios(plain, sequences, rotated=False)
    n_layers = len(plain.model.layers)
    del plain
    rotated = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                   quantization_config=RoSTEConfig(rotation_search="all"))
    set_quantization_enabled(rotated, False)
    after = collect_ratios(rotated, sequences, rotated=True)
    return [{"layer": li, **{m: {"before": before[f"{li}.{m}"], "after": after[f"{li}.{m}"]} for m in MODULES}}
            for li in range(n_layers)]
