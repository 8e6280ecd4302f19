"""Keeping optimizer state coherent when R2/R4 are switched mid-training (re-search).

Switching R4 of a layer rewrites `W_down <- W_down R` (on) or `W_down R^T` (off); switching R2
rewrites the V rows `R2^T W_v` (and bias) per head and the O columns `W_o R2` per head. R3 is
online only and touches no parameter. The full-precision function is unchanged, so the gradient
of a rewritten parameter transforms exactly like the parameter (`g' = g R` on the same side), and:

- first moments (Adam's `exp_avg`, SGD's `momentum_buffer`) and a pending `.grad` are rotated
  exactly like the weight: they stay the EMA of the gradients the new parametrisation would have
  seen (exact with quantization off; with STE the quantized gradients differ slightly anyway);
- second moments (`exp_avg_sq`, `max_exp_avg_sq`) are elementwise squares, which no rotation maps
  exactly. Assuming uncorrelated gradient coordinates, `E[g'_j^2] = sum_i R_ij^2 E[g_i^2]`, and
  every entry of a normalised Hadamard matrix has `R_ij^2 = 1/n`: the new second moment is the MEAN
  of the old one over each rotated block (the whole row for R4, each head's `head_dim` block for
  R2). It stays positive, keeps the total (trace) and the step size scale, and the step count is
  kept, so Adam's bias correction stays valid. (Resetting it to zero would make the first steps
  after a switch huge.)

Other parameter-shaped state tensors are left unchanged with a warning. The parameters must be
full (not sharded by FSDP / ZeRO-3) when this runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.utils import logging

from ..numerics.hadamard import hadamard_transform
from ..state import get_state
from .fusion import r2_signs

logger = logging.get_logger(__name__)

LINEAR_STATE = ("exp_avg", "momentum_buffer")
SQUARE_STATE = ("exp_avg_sq", "max_exp_avg_sq")


def _blocks_last(t: Tensor, dim: int, block: int) -> tuple[Tensor, tuple[int, ...]]:
    moved = t.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // block, block), tuple(moved.shape)


def _from_blocks(t: Tensor, moved_shape: tuple[int, ...], dim: int) -> Tensor:
    return t.reshape(moved_shape).movedim(-1, dim)


def rotate_tensor(t: Tensor, dim: int, block: int, signs: Tensor | None, transpose: bool) -> Tensor:
    """Rotate `t` along `dim` in consecutive blocks of `block` (float64, cast back)."""
    x, shape = _blocks_last(t.to(torch.float64), dim, block)
    s = None if signs is None else signs.to(device=t.device, dtype=torch.float64)
    return _from_blocks(hadamard_transform(x, s, transpose=transpose), shape, dim).to(t.dtype)


def block_mean(t: Tensor, dim: int, block: int) -> Tensor:
    """Replace every entry by the mean of its block of `block` along `dim` (second moments)."""
    x, shape = _blocks_last(t.to(torch.float64), dim, block)
    return _from_blocks(x.mean(-1, keepdim=True).expand_as(x), shape, dim).to(t.dtype)


@torch.no_grad()
def _transform_param(optimizer, param: nn.Parameter, rows: Tensor | None, dim: int, block: int,
                     signs: Tensor | None, transpose: bool) -> None:
    def apply(t: Tensor, fn) -> None:
        if rows is None:
            t.copy_(fn(t))
        else:
            idx = rows.to(t.device)
            t[idx] = fn(t[idx])

    def linear(t):
        return rotate_tensor(t, dim, block, signs, transpose)

    def square(t):
        return block_mean(t, dim, block)

    if param.grad is not None:
        apply(param.grad, linear)
    for key, value in optimizer.state.get(param, {}).items():
        if not isinstance(value, Tensor) or value.shape != param.shape:
            continue
        if key in LINEAR_STATE:
            apply(value, linear)
        elif key in SQUARE_STATE:
            apply(value, square)
        else:
            logger.warning("rotate_optimizer_state: unknown optimizer state %r left unchanged.", key)


def rotate_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, old_config: dict,
                           new_config: dict) -> list[str]:
    """Transform the optimizer state of every parameter rewritten by switching `old` -> `new`.

    Call it together with `set_rotation_config(model, new_config)` (before or after: only the
    optimizer state and `.grad` are touched here). Returns the names of the switches done, e.g.
    `["layer 3 R4 on"]`. See the module docstring for what happens to each moment.
    """
    state = get_state(model)
    a = state.adapter
    layers = a.decoder_layers(model)
    _, _, head_dim = a.head_layout(model)
    v_path, v_rows = a.value_rows(model)
    done = []
    for i, (old, new) in enumerate(zip(old_config["layers"], new_config["layers"], strict=True)):
        layer = layers[i]
        if old["R4"] != new["R4"]:
            down = a.get(layer, a.down_proj)
            _transform_param(optimizer, down.weight, None, 1, down.in_features, None, transpose=not new["R4"])
            done.append(f"layer {i} R4 {'on' if new['R4'] else 'off'}")
        if old["R2"] != new["R2"]:
            signs = r2_signs(head_dim, state.config.rotation_seed, i)
            v = a.get(layer, v_path)
            # V rows: R^T W_v per head == rotate each head's block of rows (dim 0)
            _transform_param(optimizer, v.weight, v_rows, 0, head_dim, signs, transpose=not new["R2"])
            if v.bias is not None:
                _transform_param(optimizer, v.bias, v_rows, 0, head_dim, signs, transpose=not new["R2"])
            o = a.get(layer, a.o_proj)
            _transform_param(optimizer, o.weight, None, 1, head_dim, signs, transpose=not new["R2"])
            done.append(f"layer {i} R2 {'on' if new['R2'] else 'off'}")
    return done
