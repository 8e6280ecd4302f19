"""Which vLLM code path a compressed-tensors export lands in, and what vLLM refuses.

Read from vllm-project/vllm `vllm/model_executor/layers/quantization/compressed_tensors/`
(`compressed_tensors.py` at commit be696453ee1bf3b7a2f652cc457b340d5a20c88c, `_get_scheme_from_parts`;
the KV-cache validator in the version that accepts strategies `tensor` and `attn_head`;
`transform/module.py` at 055e47c28003156421365af985d676fc921cb075 and `transform/linear.py` at
021d70c2da514527e441a2cf9dc11f75b28dd78d). The rules written here are the conditions of the branches
the project's exports can reach, in vLLM's order; they are re-stated independently in
`tests/export/test_vllm_targets.py`.

Linear schemes, in vLLM's order. The FP4 branches were read from a later `compressed_tensors.py` (the
version whose `_get_scheme_from_parts` calls `_is_nvfp4_format` and `_is_mxfp4`, and whose
`is_activation_quantization_format` includes `nvfp4-pack-quantized`); at be696453 the NVFP4 branches
are the same (`_is_fp4a16_nvfp4`, `_is_fp4a4_nvfp4`) and the MXFP4 one does not exist yet:

0. FP4 weights (`type: float`, 4 bits, symmetric): NVFP4 (strategy `tensor_group`, group 16) with **no
   input activations** -> `CompressedTensorsW4A16Fp4`; MXFP4 (strategy `group`, group 32) with or
   without input activations -> `CompressedTensorsW4A16Mxfp4` (weight-only: MXFP4 input activations
   are not quantized by vLLM);
1. weights static, strategy channel or group, **no input activations**, format `pack-quantized`,
   4 or 8 bits -> `CompressedTensorsWNA16` (Marlin / Machete kernels; W4A16, W8A16);
2. otherwise only an *activation-quantization format* (`int-quantized`, `float-quantized`,
   `naive-quantized`) continues:
   * 8-bit symmetric weights per channel/tensor, 8-bit **dynamic per-token** input activations ->
     `CompressedTensorsW8A8Int8` (dynamic token; CUTLASS int8 GEMM, dynamic scale amax/127);
   * 4-bit symmetric weights per channel/group, 8-bit dynamic per-token activations ->
     `CompressedTensorsW4A8Int`;
   * NVFP4 weights and NVFP4 input activations (both `tensor_group`, group 16, float 4-bit,
     symmetric) under `nvfp4-pack-quantized` (an activation-quantization format there) ->
     `CompressedTensorsW4A4Fp4` (CUTLASS FP4 GEMM, Blackwell; on other GPUs vLLM falls back to
     `CompressedTensorsW4A16Fp4` with the input global scale, i.e. weight-only FP4);
3. anything else raises `NotImplementedError("No compressed-tensors compatible scheme was found.")`.

KV cache (`CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`): `type: float`, `num_bits: 8`,
strategy `tensor` or `attn_head`, symmetric; static scales `k_scale` / `v_scale` from the checkpoint.

Online transforms (`HadamardTransform`): refused with tensor parallel size > 1; type `hadamard` runs
`ops.hadacore_transform` (with `head_dim`: block-diagonal, per block); any other type multiplies by
the stored dense matrix (`head_dim x head_dim`, or the full input size without `head_dim`).
"""

from __future__ import annotations

from typing import Any

ACTIVATION_FORMATS = ("int-quantized", "float-quantized", "naive-quantized", "nvfp4-pack-quantized")
VLLM_ENGINE = "vLLM (compressed-tensors)"


def _is_nvfp4(args: dict[str, Any] | None) -> bool:
    return (args is not None and args.get("type") == "float" and args.get("num_bits") == 4
            and args.get("strategy") == "tensor_group" and args.get("group_size") == 16 and bool(args.get("symmetric")))


def _is_mxfp4(args: dict[str, Any] | None) -> bool:
    return (args is not None and args.get("type") == "float" and args.get("num_bits") == 4
            and args.get("strategy") == "group" and args.get("group_size") == 32 and bool(args.get("symmetric")))


def linear_scheme(weights: dict[str, Any], input_activations: dict[str, Any] | None, fmt: str) -> str | None:
    """vLLM's linear scheme class for a `config_groups` entry (dicts as in config.json), None if refused."""
    if _is_nvfp4(weights) and input_activations is None:
        return "CompressedTensorsW4A16Fp4"
    if _is_mxfp4(weights):
        return "CompressedTensorsW4A16Mxfp4"
    if fmt in ACTIVATION_FORMATS and _is_nvfp4(weights) and _is_nvfp4(input_activations):
        return "CompressedTensorsW4A4Fp4"
    if weights.get("type", "int") != "int" or weights.get("dynamic"):
        return None
    strategy = weights.get("strategy")
    if input_activations is None:
        if strategy in ("channel", "group") and fmt == "pack-quantized" and weights.get("num_bits") in (4, 8):
            return "CompressedTensorsWNA16"
        return None
    if fmt not in ACTIVATION_FORMATS:
        return None
    a = input_activations
    dynamic_token = a.get("strategy") == "token" and a.get("dynamic") is True and a.get("num_bits") == 8
    if not (dynamic_token and weights.get("symmetric")):
        return None
    if weights.get("num_bits") == 8 and strategy in ("channel", "tensor"):
        return "CompressedTensorsW8A8Int8"
    if weights.get("num_bits") == 4 and strategy in ("channel", "group"):
        return "CompressedTensorsW4A8Int"
    return None


def kv_cache_accepted(kv: dict[str, Any] | None) -> bool:
    """True when vLLM's KV-cache validator accepts `kv_cache_scheme` (None: no KV quantization)."""
    if kv is None:
        return True
    return (kv.get("type") == "float" and kv.get("num_bits") == 8 and kv.get("strategy") in ("tensor", "attn_head")
            and bool(kv.get("symmetric")))


def transform_kernel(scheme: dict[str, Any]) -> str:
    """`hadacore` (vLLM's fast Hadamard kernel) or `dense` (a matrix product with the stored matrix)."""
    return "hadacore" if scheme.get("type") == "hadamard" else "dense"


def vllm_problems(quantization_config: dict[str, Any]) -> list[str]:
    """What vLLM would refuse in an exported `quantization_config` (config.json dict), each naming the setting."""
    problems = []
    fmt = quantization_config.get("format")
    for name, group in quantization_config.get("config_groups", {}).items():
        if linear_scheme(group["weights"], group.get("input_activations"), group.get("format") or fmt) is None:
            problems.append(
                f"config_groups.{name} (weights {group['weights'].get('num_bits')}-bit "
                f"{group['weights'].get('strategy')}, input_activations "
                f"{(group.get('input_activations') or {}).get('num_bits', 'none')}, format {group.get('format') or fmt}): "
                f"{VLLM_ENGINE} has no linear scheme for it (it raises 'No compressed-tensors compatible scheme'); "
                "use RoSTEConfig.for_target('vllm-w4a16'), ('vllm-w8a8') or ('vllm-nvfp4')."
            )
    if not kv_cache_accepted(quantization_config.get("kv_cache_scheme")):
        kv = quantization_config["kv_cache_scheme"]
        problems.append(
            f"kv_cache_scheme ({kv.get('num_bits')}-bit {kv.get('type')}, strategy {kv.get('strategy')}): {VLLM_ENGINE} "
            "accepts only 8-bit float K/V (strategy tensor or attn_head); train with kv_bits=16 or "
            "RoSTEConfig.for_target('vllm-w8a8') (fp8 e4m3 K/V)."
        )
    return problems
