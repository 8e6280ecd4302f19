"""What hf_roste needs to know about a model family, declared as data.

An adapter names the modules of a decoder-only causal LM in the method's own terms (residual
stream readers and writers, the V and O projections, the down projection, the norms) so that the
rotation and quantization code never hard-codes module names. Adding a family is adding an
adapter, never forking a modeling file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ArchAdapter:
    """Module layout of one transformers model family (paths are dotted, relative to their parent).

    Attributes:
        model_types: `config.model_type` values this adapter serves.
        embed: path of the token embedding, from the CausalLM root.
        layers: path of the `nn.ModuleList` of decoder layers, from the root.
        final_norm: path of the norm before the LM head, from the root.
        lm_head: path of the LM head, from the root.
        attn: attention module, relative to a decoder layer.
        qkv: projections reading the attention input (relative to a layer); one entry for a fused
            QKV projection.
        fused_qkv: True when `qkv` is one module whose output is laid out per head as
            `[q_h, k_h, v_h]` blocks of `head_dim` rows (GPT-NeoX).
        o_proj: attention output projection (writes the residual stream).
        mlp_in: projections reading the MLP input (gate/up, or dense_h_to_4h).
        up_proj: the MLP projection whose output multiplies elementwise into the down input
            (None when the MLP has no gating, e.g. GELU MLPs).
        down_proj: MLP output projection (writes the residual stream); R4 acts on its input.
        input_norm / post_attention_norm: norms feeding `qkv` and `mlp_in`.
        norm_kind: "rms" (RMSNorm, scale only) or "layernorm" (mean-centering with bias).
        head_dim_attr: attribute of the attention module holding the head dim.
        attn_cache_kwarg: keyword under which the attention module receives the KV cache when it is
            not one of transformers' standard names ("cache", "past_key_values"); GPT-NeoX: "layer_past".
    """

    name: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    final_norm: str
    lm_head: str
    attn: str
    qkv: tuple[str, ...]
    o_proj: str
    mlp_in: tuple[str, ...]
    up_proj: str | None
    down_proj: str
    input_norm: str
    post_attention_norm: str
    norm_kind: str = "rms"
    fused_qkv: bool = False
    head_dim_attr: str = "head_dim"
    attn_cache_kwarg: str | None = None
    extra_notes: tuple[str, ...] = field(default_factory=tuple)

    # --------------------------------------------------------------- lookup
    @staticmethod
    def get(root: nn.Module, path: str) -> nn.Module:
        """The submodule at dotted `path` (raises AttributeError naming the path).

        A PEFT tuner layer (e.g. a LoRA wrapper) is looked through: its base layer is returned, the
        module whose weights and flags RoSTE reads and rotates."""
        module = root.get_submodule(path)
        base = getattr(module, "get_base_layer", None)
        return base() if callable(base) else module

    @staticmethod
    def set(root: nn.Module, path: str, module: nn.Module) -> None:
        """Replace the submodule at dotted `path`."""
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, child, module)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def head_layout(self, model: nn.Module) -> tuple[int, int, int]:
        """`(num_heads, num_kv_heads, head_dim)` of the attention blocks."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        attn = self.get(self.decoder_layers(model)[0], self.attn)
        head_dim = getattr(attn, self.head_dim_attr, None) or cfg.hidden_size // heads
        return heads, kv_heads, int(head_dim)

    def quantized_linear_paths(self, model: nn.Module) -> list[str]:
        """Paths (from the root) of every linear inside the blocks that RoSTE quantizes."""
        out = []
        for i in range(self.num_layers(model)):
            base = f"{self.layers}.{i}"
            for rel in (*self.qkv, self.o_proj, *self.mlp_in, self.down_proj):
                out.append(f"{base}.{rel}")
        return out

    def residual_readers(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.get(layer, p) for p in (*self.qkv, *self.mlp_in)]

    def residual_writers(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.get(layer, self.o_proj), self.get(layer, self.down_proj)]

    def value_rows(self, model: nn.Module) -> tuple[str, torch.Tensor]:
        """`(path relative to a layer, row index tensor)` of the V-projection output rows.

        Rows are ordered kv-head by kv-head, each block `head_dim` long, so a per-head
        rotation acts on `weight[rows].view(kv_heads, head_dim, in)`.
        """
        heads, kv_heads, head_dim = self.head_layout(model)
        if self.fused_qkv:
            idx = torch.cat([torch.arange(h * 3 * head_dim + 2 * head_dim, (h + 1) * 3 * head_dim) for h in range(heads)])
            return self.qkv[0], idx
        return self.qkv[2], torch.arange(kv_heads * head_dim)
