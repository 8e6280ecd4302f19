"""RoSTE checkpoints: packed state dicts, per-tensor digests, and verification before loading.

Two formats, both safetensors, both recorded in `config.json` (`quantization_config.checkpoint_format`):

- **packed** (what `save_pretrained` / `trainer.save_model()` write): each quantized linear stores
  `weight_packed` (uint8 `[out, ceil(in * bits / 8)]`, unsigned codes, 4-bit two per byte, low
  nibble first), `weight_scale` and `weight_zero_point` (fp32 `[out, groups]`), its bias, and an
  empty uint8 `weight` marker; rotations are fused into the codes, R3/R4 flags and the seed are in
  the config.
- **master** (trainer checkpoints, `save_format(model, "master")`): full-precision weights of the
  rotated QAT model, for resuming training.

Every RoSTE checkpoint carries, in the safetensors header metadata, a digest of every tensor
(`roste_digests`: JSON `{name: blake2b(dtype|shape|bytes)}`). `verify_checkpoint` checks names,
shapes, dtypes and digests against the model skeleton before any weight is materialised, so a
truncated, bit-flipped, mismatched or tampered file is a clear error, never a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import torch
from safetensors import safe_open
from torch import nn

from ..modules.packed_fp4_linear import PackedFP4Linear
from ..modules.packed_linear import PackedLinear
from ..modules.qat_linear import QATLinear
from ..numerics.fp4 import FP4Spec

DIGEST_KEY = "roste_digests"
FORMAT_KEY = "roste_checkpoint_format"
CONFIG_KEY = "roste_quantization_config"
#: |zero point| bound implied by the quantizer's relative scale floor (see `hf_roste.numerics.quantize`).
MAX_ABS_ZERO_POINT = 2.0**20
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


class CheckpointError(ValueError):
    """A RoSTE checkpoint that does not match its config or is corrupted."""


def tensor_digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's dtype, shape and raw bytes (hex)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{_ST_DTYPES.get(t.dtype, str(t.dtype))}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the packed checkpoint of a QAT model (master weights are not modified).

    Each `QATLinear` with quantized weights becomes `weight_packed`, `weight_scale`,
    `weight_zero_point`, `bias` and the empty `weight` marker, built with the numerics module's
    quantizer: the codes are exactly what the QAT forward's weight fake-quantizer computes.
    """
    from ..progress import progress

    state = {}
    packed_prefixes = {}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear) and m.weight_spec.enabled]
    for name, module in progress(targets, "pack RoSTE weights", unit="tensor"):
        bias = None if module.bias is None else module.bias.detach()
        packed_cls = PackedFP4Linear if isinstance(module.weight_spec, FP4Spec) else PackedLinear
        packed_prefixes[name] = packed_cls.from_float(module.weight.detach(), bias, module.weight_spec,
                                                      module.act_spec)
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in packed_prefixes and leaf in ("weight", "bias"):
            continue
        state[key] = value
    for prefix, packed in packed_prefixes.items():
        for leaf, value in packed.state_dict().items():
            state[f"{prefix}.{leaf}"] = value
    return state


def checkpoint_metadata(model: nn.Module, state: dict[str, torch.Tensor], fmt: str, config=None) -> dict[str, str]:
    """safetensors header metadata: format plus the digest of every tensor, keyed by file names.

    With `config` (the `RoSTEConfig` written to config.json by the same save), its JSON is recorded
    too, so a config.json edited or swapped afterwards (bits, rotation flags, ...) is refused on load.

    transformers renames some keys when saving (e.g. GPT-NeoX `lm_head` -> `embed_out`); the same
    renaming is applied here so the table lists the names found in the files.
    """
    from transformers.core_model_loading import revert_weight_conversion

    file_state = revert_weight_conversion(model, dict(state))
    digests = {k: tensor_digest(v) for k, v in file_state.items()}
    meta = {"format": "pt", FORMAT_KEY: fmt, DIGEST_KEY: json.dumps(digests, sort_keys=True)}
    if config is not None:
        meta[CONFIG_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    return meta


def _config_disagreement(name: str, saved_json: str, config) -> str | None:
    """Fields where config.json's quantization_config differs from the one recorded in the file."""
    try:
        saved = json.loads(saved_json)
    except json.JSONDecodeError:
        return f"{name}: the quantization config recorded in its metadata is unreadable"
    if not isinstance(saved, dict):
        return f"{name}: the quantization config recorded in its metadata is not a JSON object"
    current = config.to_dict()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = json.dumps(saved.get(key), sort_keys=True), json.dumps(current.get(key), sort_keys=True)
        if a != b:
            diffs.append(f"{key}: {a[:120]} when saved, {b[:120]} in config.json")
    if diffs:
        return (f"{name}: config.json's quantization_config differs from the one this file was saved with ("
                + "; ".join(diffs[:6]) + ")")
    return None


def _model_key_mapper(model: nn.Module, hf_quantizer=None):
    """A function mapping a checkpoint key to the model's key, as transformers' loader renames it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model, None, hf_quantizer)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def to_model_key(key: str) -> str:
        return rename_source_key(key, renamings, converters, prefix, meta)[0]

    return to_model_key


def _safetensors_files(checkpoint_files: Iterable[str] | None) -> list[str]:
    files = [f for f in (checkpoint_files or []) if f]
    bad = [f for f in files if not f.endswith(".safetensors")]
    if bad:
        raise CheckpointError(
            f"RoSTE checkpoints are loaded from safetensors only; got {bad}. Re-save the model with "
            "save_pretrained (safetensors is the default)."
        )
    if not files:
        raise CheckpointError("No safetensors file found for this RoSTE checkpoint.")
    return files


def verify_checkpoint(
    model: nn.Module, checkpoint_files: Iterable[str] | None, expected_format: str, hf_quantizer=None,
    check_config: bool = True,
) -> None:
    """Check a RoSTE checkpoint against the (meta) skeleton it will be loaded into.

    Raises `CheckpointError` naming the file and the problem: unreadable or truncated file,
    missing digests, a digest mismatch (corrupted bytes), missing or unexpected tensors, wrong
    shapes, wrong dtypes of codes and scales, or a format that disagrees with config.json.
    `check_config=False` skips the comparison of the recorded quantization config with
    `hf_quantizer`'s (for callers that compare the settings themselves, e.g. trainer resume).
    """
    files = _safetensors_files(checkpoint_files)
    expected = {k: v for k, v in model.state_dict().items()}
    to_model_key = _model_key_mapper(model, hf_quantizer)
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    file_keys: set[str] = set()
    digests: dict[str, str] | None = None
    config_problem: str | None = None
    for path in files:
        name = os.path.basename(path)
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{name}: not a readable safetensors file ({exc}); the file is truncated or corrupted.") from exc
        with handle as f:
            meta = f.metadata() or {}
            fmt = meta.get(FORMAT_KEY)
            if fmt != expected_format:
                raise CheckpointError(
                    f"{name}: safetensors metadata says checkpoint format {fmt!r} but config.json says "
                    f"{expected_format!r}; the files and the config come from different saves."
                )
            config = getattr(hf_quantizer, "quantization_config", None)
            if check_config and CONFIG_KEY in meta and config is not None and config_problem is None:
                config_problem = _config_disagreement(name, meta[CONFIG_KEY], config)
            try:
                file_digests = json.loads(meta[DIGEST_KEY])
            except (KeyError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{name}: the tensor digests in its metadata are missing or unreadable.") from exc
            if digests is None:
                digests = file_digests
            elif file_digests != digests:
                raise CheckpointError(f"{name}: its digest table differs from the other shards'.")
            for key in f.keys():
                try:
                    tensor = f.get_tensor(key)
                except Exception as exc:
                    raise CheckpointError(f"{name}: tensor {key!r} cannot be read ({exc}); the file is truncated.") from exc
                if digests.get(key) != tensor_digest(tensor):
                    raise CheckpointError(
                        f"{name}: tensor {key!r} does not match its recorded digest: the file is corrupted or was "
                        "modified after saving."
                    )
                seen[to_model_key(key)] = (tuple(tensor.shape), _ST_DTYPES.get(tensor.dtype, str(tensor.dtype)))
                file_keys.add(key)
    assert digests is not None
    problems = []
    missing = sorted(set(expected) - set(seen))
    unexpected = sorted(set(seen) - set(expected))
    unlisted = sorted(set(digests) - file_keys)
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if unlisted:
        problems.append(f"tensors recorded in the digest table but absent from the files {unlisted[:8]}")
    for key in sorted(set(expected) & set(seen)):
        shape, dtype = seen[key]
        want = expected[key]
        if tuple(want.shape) != shape:
            problems.append(f"{key}: shape {list(shape)} in the file, {list(want.shape)} expected from config.json")
        leaf = key.rpartition(".")[2]
        if leaf in ("weight_packed",) and dtype != "U8":
            problems.append(f"{key}: dtype {dtype}, expected U8 codes")
        want_dtype = _ST_DTYPES.get(want.dtype, str(want.dtype))
        if leaf in ("weight_scale", "weight_zero_point", "weight_global_scale") and dtype != want_dtype:
            problems.append(f"{key}: dtype {dtype}, expected {want_dtype}")
    if problems:
        raise CheckpointError(
            "This RoSTE checkpoint does not match its config.json (bits, group size, rotations or model shape): "
            + "; ".join(problems[:12])
            + ". Re-save the model with hf_roste, or load the config it was saved with."
        )
    if config_problem:  # same shapes, different quantizer or rotations: a silently different model otherwise
        raise CheckpointError(config_problem + "; the files and the config come from different saves.")


def check_packed_values(model: nn.Module) -> None:
    """After loading: scales finite and positive, zero points finite integers with |z| <= 2**20."""
    for name, module in model.named_modules():
        if isinstance(module, PackedFP4Linear):
            _check_fp4_values(name, module)
            continue
        if not isinstance(module, PackedLinear):
            continue
        s, z = module.weight_scale, module.weight_zero_point
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise CheckpointError(f"{name}.weight_scale has non-finite or non-positive values.")
        if not bool(torch.isfinite(z).all()) or not bool((z == z.round()).all()):
            raise CheckpointError(f"{name}.weight_zero_point must hold finite integers.")
        if z.numel() and float(z.abs().max()) > MAX_ABS_ZERO_POINT:
            raise CheckpointError(
                f"{name}.weight_zero_point has |values| up to {float(z.abs().max()):g}; the quantizer never writes more "
                f"than 2**20 = {MAX_ABS_ZERO_POINT:g}."
            )
        if module.weight_spec.symmetric and bool((z != 0).any()):
            raise CheckpointError(f"{name}.weight_zero_point must be 0 for symmetric weights.")


def _check_fp4_values(name: str, module: PackedFP4Linear) -> None:
    """FP4 layers: NVFP4 block scales finite and >= 0 with a finite positive global scale; MXFP4 e8m0
    codes below 255 (the NaN code, which the quantizer only writes for non-finite weights)."""
    if module.weight_spec.format == "nvfp4":
        s = module.weight_scale.float()
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise CheckpointError(f"{name}.weight_scale has non-finite or negative fp8 block scales.")
        g = module.weight_global_scale
        if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
            raise CheckpointError(f"{name}.weight_global_scale must be finite and positive.")
    elif bool((module.weight_scale == 255).any()):
        raise CheckpointError(f"{name}.weight_scale holds the e8m0 NaN code 255.")
