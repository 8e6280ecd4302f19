"""Serving targets: a `RoSTEConfig` that trains exactly what an inference engine runs.

    from hf_roste import RoSTEConfig
    config = RoSTEConfig.for_target("vllm-w4a16")                 # or hf-roste sft --target vllm-w4a16
    config = RoSTEConfig.for_target("llama.cpp-q4_0", rotation_seed=3)

A target is an engine plus one of its quantized formats. Its table entry gives

* ``config``: the `RoSTEConfig` fields the target sets (everything else keeps RoSTEConfig's default);
* ``engine_limits``: the fields the engine fixes, each with the values it can run. An override
  outside them raises a `ValueError` naming the engine and the setting;
* the export format (``compressed-tensors`` for vLLM, ``gguf`` for llama.cpp, ``roste`` for the
  project's own packed kernels) and a one-line serving command for the model card.

The numerics behind the targets (all shared by training, packing and export):

* ``vllm-w8a8``: vLLM's dynamic int8 activation quantizer is ``scale = amax / 127``, codes
  ``round_half_even(x * 127 / amax)`` (``csrc/quantization/compressed_tensors/int8_quant_kernels.cu``):
  RoSTE's symmetric rule with clip ratio 1.0. K/V are fp8 e4m3 with a static scale per KV head
  (`hf_roste.numerics.Fp8Spec`, scale 1.0, compressed-tensors ``kv_cache_scheme`` strategy ``attn_head``);
* ``vllm-w4a16-r4``: the online R4 is block-diagonal (`hf_roste.numerics.block_hadamard`), written
  as a ``hadamard`` transform with ``head_dim`` = the block size, vLLM's power-of-two kernel;
* ``vllm-nvfp4``: weights and linear inputs NVFP4 (`hf_roste.numerics.fp4`, bit for bit compressed-tensors'
  NVFP4 codes), exported as ``nvfp4-pack-quantized`` (`hf_roste.export.compressed_tensors_fp4`), which vLLM
  runs as ``CompressedTensorsW4A4Fp4``. The activations' fp32 global scale is per token in training
  and a static ``input_global_scale`` per layer calibrated at export; K/V fp8 e4m3 as ``vllm-w8a8``; the
  online R4 is block-diagonal with block 16, a ``hadamard`` transform that vLLM fuses into its QuTLASS
  NVFP4 kernel (block sizes 16-128);
* ``llama.cpp-q4_0``: weights symmetric int4 in groups of 32 with scales rounded to fp16 during
  training (``weight_scale_dtype="float16"``), so GGUF ``Q4_0`` blocks hold the trained codes and
  scales exactly; no online rotation (llama.cpp has none), R1 and R2 fused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TARGETS", "ServingTarget", "config_for_target", "get_target", "target_problems"]

#: vLLM's dynamic symmetric int8 per-token activation scale is amax / 127: RoSTE clip ratio 1.0.
VLLM_INT8_DYNAMIC_CLIP = 1.0
#: NVFP4 block size: the default block of the vllm-nvfp4 target's online R4 (QuTLASS accepts 16, 32, 64, 128)
NVFP4_BLOCK = 16


@dataclass(frozen=True)
class ServingTarget:
    """One serving target (see the module docstring).

    Attributes:
        name: the name given to `RoSTEConfig.for_target` / `--target`.
        engine: the engine (and format) that serves the exported model.
        export_format: `hf-roste export --format` value that writes what the engine loads.
        config: RoSTEConfig fields set by the target.
        engine_limits: field -> allowed values (what the engine can run); checked on overrides.
        serve_command: command line template for the card (`{model}` = repo id or path).
        hardware: GPU generations / CPUs the engine runs this format on.
        parallelism: the parallelism the format supports in the engine.
        description: one line for tables and help.
    """

    name: str
    engine: str
    export_format: str
    config: dict[str, Any]
    engine_limits: dict[str, tuple] = field(default_factory=dict)
    serve_command: str = ""
    hardware: str = ""
    parallelism: str = ""
    description: str = ""


_FUSED_ONLY = ((), ("R1",), ("R2",), ("R1", "R2"))  # rotations without an online part

TARGETS: dict[str, ServingTarget] = {
    t.name: t
    for t in (
        ServingTarget(
            name="paper",
            engine="hf_roste packed kernels (transformers)",
            export_format="roste",
            config={},
            serve_command='python -c "import hf_roste, transformers; '
                          "m = transformers.AutoModelForCausalLM.from_pretrained('{model}')\"",
            hardware="CPU (oneDNN / torch int kernels), CUDA GPUs through the Triton kernels",
            parallelism="single process (transformers)",
            description="The paper's W4A4KV4 (asymmetric, clip 0.95, R1-R4 by the adaptive search); research and "
                        "the project's own packed kernels.",
        ),
        ServingTarget(
            name="vllm-w4a16",
            engine="vLLM (compressed-tensors pack-quantized, WNA16: Marlin / Machete kernels)",
            export_format="compressed-tensors",
            config=dict(weight_bits=4, weight_symmetric=True, weight_group_size=128, activation_bits=16, kv_bits=16,
                        rotations=("R1", "R2"), rotation_search="all"),
            engine_limits=dict(weight_bits=(4,), weight_symmetric=(True,), weight_group_size=(None, 32, 64, 128),
                               activation_bits=(16,), kv_bits=(16,), rotations=_FUSED_ONLY, kv_format=("int",),
                               weight_scale_dtype=("float32", "float16")),
            serve_command="vllm serve {model}",
            hardware="NVIDIA Ampere (sm80+), Ada, Hopper, Blackwell (Marlin; Machete on Hopper)",
            parallelism="tensor and pipeline parallel (weights only, no online transform)",
            description="int4 symmetric weights, group 128; activations and KV in bf16/fp16; R1+R2 fused.",
        ),
        ServingTarget(
            name="vllm-w8a8",
            engine="vLLM (compressed-tensors int-quantized, W8A8 int8 dynamic per token; fp8 KV cache)",
            export_format="compressed-tensors",
            config=dict(weight_bits=8, weight_symmetric=True, weight_group_size=None, activation_bits=8,
                        activation_symmetric=True, activation_clip_ratio=VLLM_INT8_DYNAMIC_CLIP, kv_bits=8,
                        kv_symmetric=True, kv_format="fp8_e4m3", rotations=("R1", "R2"), rotation_search="all",
                        r4_block_size=128),
            engine_limits=dict(weight_bits=(8,), weight_symmetric=(True,), weight_group_size=(None,),
                               activation_bits=(8,), activation_symmetric=(True,),
                               activation_clip_ratio=(VLLM_INT8_DYNAMIC_CLIP,), kv_bits=(8, 16),
                               kv_format=("fp8_e4m3", "int"),
                               rotations=_FUSED_ONLY + (("R1", "R4"), ("R2", "R4"), ("R1", "R2", "R4"), ("R4",)),
                               weight_scale_dtype=("float32",)),
            serve_command="vllm serve {model} --kv-cache-dtype fp8",
            hardware="NVIDIA Turing (sm75+) for int8 W8A8 (CUTLASS); fp8 KV cache: Ada / Hopper / Blackwell",
            parallelism="tensor and pipeline parallel; with R4 (block Hadamard): single GPU (tensor parallel 1)",
            description="int8 weights per channel, int8 dynamic per-token activations, fp8 e4m3 KV per head; "
                        "R1+R2 fused, optional R4 as a block-diagonal Hadamard (r4_block_size).",
        ),
        ServingTarget(
            name="vllm-w4a16-r4",
            engine="vLLM (compressed-tensors pack-quantized WNA16 + online hadamard transform on down_proj)",
            export_format="compressed-tensors",
            config=dict(weight_bits=4, weight_symmetric=True, weight_group_size=128, activation_bits=16, kv_bits=16,
                        rotations=("R1", "R2", "R4"), rotation_search="all", r4_block_size=128),
            engine_limits=dict(weight_bits=(4,), weight_symmetric=(True,), weight_group_size=(None, 32, 64, 128),
                               activation_bits=(16,), kv_bits=(16,), kv_format=("int",),
                               rotations=(("R1", "R2", "R4"), ("R1", "R4"), ("R2", "R4"), ("R4",)),
                               r4_block_size=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                               weight_scale_dtype=("float32", "float16")),
            serve_command="vllm serve {model} --tensor-parallel-size 1",
            hardware="NVIDIA Ampere (sm80+), Ada, Hopper, Blackwell (Marlin + vLLM's Hadamard kernel)",
            parallelism="single GPU: vLLM applies online transforms only with tensor parallel size 1",
            description="vllm-w4a16 plus an online R4 on the down_proj input, block-diagonal Hadamard (block 128).",
        ),
        ServingTarget(
            name="vllm-nvfp4",
            engine="vLLM (compressed-tensors nvfp4-pack-quantized: W4A4 FP4, CompressedTensorsW4A4Fp4; fp8 KV cache)",
            export_format="compressed-tensors",
            config=dict(weight_bits=4, activation_bits=4, weight_format="nvfp4", activation_format="nvfp4",
                        kv_bits=8, kv_symmetric=True, kv_format="fp8_e4m3", rotations=("R1", "R2", "R4"),
                        rotation_search="all", r4_block_size=NVFP4_BLOCK),
            engine_limits=dict(weight_bits=(4,), activation_bits=(4,), weight_format=("nvfp4",),
                               activation_format=("nvfp4",), kv_bits=(8, 16), kv_format=("fp8_e4m3", "int"),
                               rotations=_FUSED_ONLY + (("R1", "R2", "R4"), ("R1", "R4"), ("R2", "R4"), ("R4",)),
                               r4_block_size=(16, 32, 64, 128), weight_scale_dtype=("float32",)),
            serve_command="vllm serve {model} --kv-cache-dtype fp8 --tensor-parallel-size 1",
            hardware="NVIDIA Blackwell (sm100: CUTLASS / FlashInfer FP4 GEMM); with the block R4, vLLM's QuTLASS "
                     "NVFP4 path (sm90+); elsewhere vLLM falls back to weight-only FP4 (CompressedTensorsW4A16Fp4)",
            parallelism="single GPU with the online R4 (vLLM applies transforms only with tensor parallel size 1); "
                        "tensor and pipeline parallel with rotations=('R1', 'R2')",
            description="NVFP4 weights and activations (e2m1, blocks of 16, fp8 block scales, fp32 global scale), fp8 "
                        "e4m3 KV per head; R1+R2 fused, R4 online as a block-diagonal Hadamard of 16 (the NVFP4 block).",
        ),
        ServingTarget(
            name="llama.cpp-q4_0",
            engine="llama.cpp GGUF Q4_0 (also Ollama, LM Studio, llama-cpp-python)",
            export_format="gguf",
            config=dict(weight_bits=4, weight_symmetric=True, weight_group_size=32, weight_scale_dtype="float16",
                        activation_bits=16, kv_bits=16, rotations=("R1", "R2"), rotation_search="all"),
            engine_limits=dict(weight_bits=(4,), weight_symmetric=(True,), weight_group_size=(32,),
                               weight_scale_dtype=("float16",), activation_bits=(16,), kv_bits=(16,),
                               kv_format=("int",), rotations=_FUSED_ONLY, r4_block_size=(None,)),
            serve_command="llama-cli -m {model} -cnv",
            hardware="CPUs (x86 AVX2/AVX-512, ARM NEON), Apple Metal, CUDA, Vulkan",
            parallelism="single process; llama.cpp's own layer/row split across GPUs",
            description="Q4_0: symmetric int4, group 32, fp16 scales rounded in training; activations/KV full "
                        "precision in training (llama.cpp quantizes activations to 8 bits itself); R1+R2 fused.",
        ),
    )
}


def get_target(name: str) -> ServingTarget:
    """The target called `name`; `ValueError` listing the names otherwise."""
    if not isinstance(name, str) or name not in TARGETS:
        raise ValueError(f"Unknown serving target {name!r}; available targets: {', '.join(TARGETS)}.")
    return TARGETS[name]


def _normalise(field_name: str, value: Any) -> Any:
    if field_name == "rotations":
        order = ("R1", "R2", "R3", "R4")
        return tuple(r for r in order if r in tuple(value))
    return value


def target_problems(target: ServingTarget | str, config: Any) -> list[str]:
    """Settings of `config` (a RoSTEConfig) that `target`'s engine cannot run, each naming engine and fix."""
    target = get_target(target) if isinstance(target, str) else target
    problems = []
    for name, allowed in target.engine_limits.items():
        value = _normalise(name, getattr(config, name))
        ok = value in (tuple(_normalise(name, a) for a in allowed) if name == "rotations" else allowed)
        if not ok:
            shown = list(value) if name == "rotations" else value
            choices = [list(a) for a in allowed] if name == "rotations" else list(allowed)
            problems.append(
                f"{name}={shown!r}: {target.engine} cannot run it; target {target.name!r} accepts {name} in {choices}."
            )
    return problems


def config_for_target(config_cls: type, name: str, **overrides: Any):
    """`RoSTEConfig.for_target`: the target's config (an instance of `config_cls`) with `overrides`, checked
    against the engine. (`config_cls` is passed in so that this table, which `config.py` reads, imports no config.)"""
    target = get_target(name)
    if "target" in overrides:
        raise ValueError("RoSTEConfig.for_target sets `target` itself; do not pass target=... as an override.")
    fields = {**target.config, **overrides, "target": target.name}
    config = config_cls(**fields)
    problems = target_problems(target, config)
    if problems:
        raise ValueError(f"RoSTEConfig.for_target({name!r}) with overrides {sorted(overrides)}: " + " ".join(problems))
    return config

