"""Export a RoSTE FP4 model to compressed-tensors `nvfp4-pack-quantized` / `mxfp4-pack-quantized`.

    from hf_roste.export.compressed_tensors_fp4 import export_compressed_tensors_fp4
    export_compressed_tensors_fp4(model, "my-model-nvfp4", calibration=[input_ids, ...])

Who loads what:

- `nvfp4-pack-quantized` (NVFP4 weights, optional NVFP4 activations): vLLM's compressed-tensors
  integration (`CompressedTensorsW4A4Fp4` on Blackwell for W4A4, `CompressedTensorsW4A16Fp4` for
  weight-only), and transformers' compressed-tensors integration (decompresses to a float model
  on load; CPU works).
- `mxfp4-pack-quantized` (MXFP4 weights, optional dynamic MXFP4 activations): compressed-tensors
  0.x reads and writes it and transformers loads it through the same integration; which vLLM kernels
  serve it depends on the vLLM version and GPU (not verified here, no GPU). FP-Quant's checkpoints
  use their own `fp_quant` quantization config instead.

What is written:

- every RoSTE-quantized linear as `weight_packed` (uint8, two e2m1 codes per byte, the even index in
  the low nibble), `weight_scale` (float8_e4m3fn for NVFP4, uint8 e8m0 for MXFP4) and, for NVFP4,
  `weight_global_scale` (fp32 `[1]`). These are hf_roste's packed tensors unchanged: hf_roste's
  quantizer computes compressed-tensors' NVFP4/MXFP4 codes and scales bit for bit (tests), and
  every layer is decompressed with compressed-tensors' own compressor here and compared with
  hf_roste's dequantized weight;
- `config_groups.group_0`: weights (`tensor_group` + fp8 scales for NVFP4, `group` + uint8 scales for
  MXFP4, 16 / 32 values per block); with FP4 activations, `input_activations` of the same format;
  with int activations, compressed-tensors' dynamic per-token int scheme; `ignore` lists lm_head and
  `modules_to_not_convert`;
- `kv_cache_scheme` and the online R4 exactly as the int export writes them (`hf_roste.export.
  compressed_tensors`), with the same conditions (symmetric K/V with the matching clip ratio, no R3
  with quantized K/V, power-of-two R4 here).

NVFP4 activations need a static `input_global_scale` per layer (compressed-tensors' NVFP4 scheme:
block scales are dynamic, the fp32 global scale is calibrated). RoSTE trains with one global scale
per token instead (batch-independent); the export computes each layer's `input_global_scale` as
`2688 / amax` over `calibration` batches run through the model (the `static_minmax` observer's rule),
so the served activations differ from the trained ones only in the rounding of the fp8 block scales.
Without `calibration` an NVFP4-activation model is refused (pass `calibration=` or export the
weights only with `activations=False`, i.e. the NVFP4A16 / MXFP4A16 scheme).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import RoSTEConfig
from ..modules.packed_fp4_linear import PackedFP4Linear
from ..modules.qat_linear import QATLinear
from ..numerics.block_hadamard import r4_transform
from ..numerics.fp4 import FP4Spec, dequantize_fp4, nvfp4_global_scale, unpack_fp4
from .compressed_tensors import (
    SUMMARY_FILE,
    TRANSFORM_NAME,
    ExportError,
    _dynamic_args,
    _dynamic_problems,
    _hadamard_weight,
    _kv_args,
    _load,
    build_transform_config,
    fp8_kv_scale_tensors,
    model_problems,
    write_export_files,
    write_plain_config,
)

logger = logging.get_logger(__name__)

FORMAT_NAMES = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def check_exportable_fp4(config: RoSTEConfig, model: nn.Module | None = None, *, activations: bool = True,
                         calibration: Any = None) -> list[str]:
    """Reasons an FP4 RoSTE model cannot be exported (empty when it can); each names the fix."""
    problems = []
    if config.weight_format not in FORMAT_NAMES:
        problems.append(f"weight_format={config.weight_format!r}: this export writes FP4 weights; use "
                        "hf_roste.export.compressed_tensors.export_compressed_tensors for int weights.")
        return problems
    if activations and config.activation_format == "int" and config.activation_bits < 16:
        problems += _dynamic_problems(
            "activation", "asymmetric activations (activation_symmetric=False): compressed-tensors' dynamic "
            "per-token int activations are served symmetric", "dynamic activation scales are computed by the engine",
            config.activation_bits, config.activation_symmetric, config.activation_clip_ratio, True, "")
    if activations and config.activation_format not in ("int", config.weight_format):
        problems.append(f"activation_format={config.activation_format!r} with weight_format={config.weight_format!r}: "
                        "compressed-tensors' FP4 schemes use one format for both; train with the same format or "
                        "export with activations=False.")
    if activations and config.activation_format == "nvfp4" and calibration is None:
        problems.append("NVFP4 activations need a static input_global_scale per layer: pass calibration=[input_ids "
                        "batches] (a few batches of the fine-tuning data; hf-roste export --dataset DATA), or "
                        "activations=False (hf-roste export --weights-only) for NVFP4A16.")
    problems += model_problems(config, model, strict=True, power_of_two_r4=True)
    return problems


def _fp4_args(fmt: str, *, weights: bool):
    from compressed_tensors.quantization import QuantizationArgs

    kw: dict[str, Any] = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16 if fmt == "nvfp4" else 32}
    if fmt == "nvfp4":
        kw.update(strategy="tensor_group", scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn,
                  dynamic=False if weights else "local")
        if not weights:
            kw["observer"] = "static_minmax"
    else:
        kw.update(strategy="group", scale_dtype=torch.uint8, zp_dtype=torch.uint8, dynamic=not weights)
    return QuantizationArgs(**kw)


def build_quantization_config_fp4(config: RoSTEConfig, ignore: list[str], activations: bool):
    """compressed-tensors `QuantizationConfig` of an FP4 RoSTE config (status compressed)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    fmt = config.weight_format
    act = None
    if activations and config.activation_bits < 16:
        act = _fp4_args(fmt, weights=False) if config.activation_format == fmt else _dynamic_args(config.activation_bits)
    scheme = QuantizationScheme(targets=["Linear"], weights=_fp4_args(fmt, weights=True), input_activations=act,
                                format=FORMAT_NAMES[fmt])
    return QuantizationConfig(config_groups={"group_0": scheme},
                              kv_cache_scheme=_kv_args(config) if config.kv_bits < 16 else None,
                              format=FORMAT_NAMES[fmt], quantization_status="compressed", ignore=ignore)


@torch.no_grad()
def calibrate_input_global_scales(model: nn.Module, calibration) -> dict[str, torch.Tensor]:
    """Per FP4 linear: NVFP4 `input_global_scale` = 2688 / max |input| (after the online R4) over `calibration`.

    Args:
        model: a RoSTE FP4 model (QAT or packed).
        calibration: iterable of `input_ids` tensors or dicts of model inputs.
    """
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args):
            x = args[0]
            if isinstance(mod, QATLinear) and mod.input_hadamard:
                x = r4_transform(x, mod.input_hadamard_block)
            elif isinstance(mod, PackedFP4Linear) and mod.input_transform is not None:
                x = mod.input_transform(x)
            m = x.detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (QATLinear, PackedFP4Linear)):
            hooks.append(module.register_forward_pre_hook(make_hook(name, module)))
    from ..progress import progress

    count = 0
    try:
        for batch in progress(calibration, "calibrate NVFP4 input scales", unit="batch"):
            kwargs = batch if isinstance(batch, dict) else {"input_ids": batch}
            model(**kwargs)
            count += 1
    finally:
        for h in hooks:
            h.remove()
    if count == 0:
        raise ExportError("calibration is empty: pass at least one batch of input_ids.")
    return {name: nvfp4_global_scale(a).reshape(1) for name, a in amax.items()}


def _fp4_linears(model: nn.Module, state) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    from .checkpoint import packed_state_dict

    sd = model.state_dict() if state.packed else packed_state_dict(model)
    out = {}
    for key in sd:
        if key.endswith(".weight_packed"):
            prefix = key[: -len(".weight_packed")]
            out[prefix] = {leaf: sd[f"{prefix}.{leaf}"] for leaf in ("weight_packed", "weight_scale",
                                                                    "weight_global_scale", "bias")
                           if f"{prefix}.{leaf}" in sd and sd[f"{prefix}.{leaf}"] is not None}
    rest = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in out}
    return out, rest


@torch.no_grad()
def _check_layer(name: str, t: dict[str, torch.Tensor], spec: FP4Spec, scheme) -> None:
    """compressed-tensors' compressor decompresses the tensors to hf_roste's dequantized weight."""
    from compressed_tensors.compressors import BaseCompressor

    packed = t["weight_packed"]
    ours = dequantize_fp4(unpack_fp4(packed, packed.shape[1] * 2), t["weight_scale"], t.get("weight_global_scale"),
                          spec)
    compressor = BaseCompressor.get_value_from_registry(FORMAT_NAMES[spec.format])
    sd = {k: v for k, v in t.items() if k != "bias"}
    back = compressor.decompress(sd, scheme)["weight"]
    # compressed-tensors decompresses in bfloat16: compare at that precision
    if not torch.allclose(back.float(), ours.to(back.dtype).float(), rtol=2**-7, atol=0):
        err = (back.float() - ours).abs().max().item()
        raise ExportError(f"internal: {name} does not decompress to the RoSTE weight (max abs diff {err:.3g}).")


def export_compressed_tensors_fp4(model_or_dir, out_dir: str | os.PathLike, *, calibration=None,
                                  activations: bool = True, tokenizer: Any = None,
                                  max_shard_size: str = "5GB") -> dict[str, Any]:
    """Write a compressed-tensors NVFP4 / MXFP4 checkpoint of an FP4 RoSTE model (see the module docstring).

    Args:
        model_or_dir: a RoSTE FP4 model (QAT or packed) or a saved RoSTE folder.
        out_dir: output folder.
        calibration: batches of input_ids (or input dicts) for NVFP4 activations' `input_global_scale`.
        activations: write the activation scheme (False: weight-only NVFP4A16 / MXFP4A16).
        tokenizer: saved next to the model; by default the source folder's tokenizer is copied if any.

    Returns:
        a summary dict (also written to `roste_export.json`).

    Raises:
        ExportError: the model uses an option the format cannot express (the message names it).
    """
    from compressed_tensors.quantization import QuantizationScheme
    from transformers.core_model_loading import revert_weight_conversion

    from ..state import get_state
    from .paths import check_output_is_not_source

    check_output_is_not_source(model_or_dir, out_dir, "export_compressed_tensors_fp4")
    src_dir = None if isinstance(model_or_dir, nn.Module) else os.fspath(model_or_dir)
    model = _load(model_or_dir)
    state = get_state(model)
    config = state.config
    problems = check_exportable_fp4(config, model, activations=activations, calibration=calibration)
    if problems:
        raise ExportError("This RoSTE model cannot be exported to compressed-tensors FP4:\n- " + "\n- ".join(problems))
    spec = config.weight_spec
    adapter = state.adapter
    linears, rest = _fp4_linears(model, state)
    quantized = set(adapter.quantized_linear_paths(model)) & set(linears)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    weights_scheme = QuantizationScheme(targets=["Linear"], weights=_fp4_args(spec.format, weights=True))
    input_scales = {}
    if activations and config.activation_format == "nvfp4" and config.activation_bits < 16:
        input_scales = calibrate_input_global_scales(model, calibration)

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tensors = {k: v for k, v in rest.items() if not (v.dtype == torch.uint8 and v.numel() == 0)}
    for name, t in linears.items():
        _check_layer(name, t, spec, weights_scheme)
        for leaf, v in t.items():
            tensors[f"{name}.{leaf}"] = v
        if name in input_scales:
            tensors[f"{name}.input_global_scale"] = input_scales[name]
    r4_modules = [f"{adapter.layers}.{i}.{adapter.down_proj}" for i, f in enumerate(state.applied["layers"]) if f["R4"]]
    transform_config = None
    if r4_modules:
        size = adapter.get(adapter.decoder_layers(model)[0], adapter.down_proj).in_features
        block = config.r4_block_size
        kind, h, _ = _hadamard_weight(block or size, dtype)
        transform_config = build_transform_config(r4_modules, kind, head_dim=block)
        for name in r4_modules:
            tensors[f"{name}.{TRANSFORM_NAME}_input.weight"] = h
    if config.kv_bits < 16 and config.kv_format == "fp8_e4m3":
        tensors.update(fp8_kv_scale_tensors(model, adapter, config, dtype))
    file_tensors = revert_weight_conversion(model, tensors)
    file_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in file_tensors.items()}

    os.makedirs(out_dir, exist_ok=True)
    write_plain_config(model, out_dir, dtype)
    qconfig = build_quantization_config_fp4(config, ignore, activations)
    if config.target is not None and config.target.startswith("vllm-"):
        from .vllm import vllm_problems

        refused = vllm_problems(qconfig.model_dump(mode="json"))
        if refused:
            raise ExportError(f"RoSTE target {config.target!r} exported something vLLM would not run:\n- "
                              + "\n- ".join(refused))
    write_export_files(out_dir, qconfig, transform_config, file_tensors, max_shard_size, tokenizer, src_dir)
    notes = []
    if input_scales:
        notes.append("NVFP4 activations: input_global_scale (2688 / max |x|) calibrated per layer on the calibration "
                     "batches; training used one global scale per token.")
    schemes = _vllm_schemes(qconfig)
    if activations and config.activation_bits < 16 and "CompressedTensorsW4A16Mxfp4" in schemes:
        notes.append("vLLM serves MXFP4 compressed-tensors checkpoints weight-only (CompressedTensorsW4A16Mxfp4): the "
                     "MXFP4 input activations written here are not quantized there.")
    summary = {
        "format": f"compressed-tensors {FORMAT_NAMES[spec.format]}",
        "scheme": config.scheme_name,
        "quantized_linears": len(linears),
        "ignore": ignore,
        "activations": (config.activation_format if activations and config.activation_bits < 16 else None),
        "calibrated_input_global_scales": len(input_scales),
        "r4_layers": len(r4_modules),
        "r4_block_size": config.r4_block_size if r4_modules else None,
        "kv_cache": config.kv_format if config.kv_bits < 16 else None,
        "target": config.target,
        "vllm_scheme": schemes,
        "notes": notes,
    }
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump({**summary, "roste_config": config.to_dict()}, f, indent=2, sort_keys=True)
        f.write("\n")
    from .export_card import render_export_card

    card = render_export_card(out_dir, repo_id=os.path.basename(os.path.normpath(os.fspath(out_dir))))
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    return summary


def _vllm_schemes(qconfig) -> list[str | None]:
    """The vLLM linear scheme each config group lands in (None: refused), see `hf_roste.export.vllm`."""
    from .vllm import linear_scheme

    d = qconfig.model_dump(mode="json")
    return [linear_scheme(g["weights"], g.get("input_activations"), g.get("format") or d.get("format"))
            for g in d["config_groups"].values()]
