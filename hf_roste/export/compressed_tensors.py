"""Export a RoSTE model to the compressed-tensors `pack-quantized` format (vLLM, plain transformers).

    from hf_roste.export.compressed_tensors import export_compressed_tensors
    export_compressed_tensors("my-roste-model", "my-model-ct")     # or a loaded RoSTE model

What is written (built with compressed-tensors' own `QuantizationArgs` / `QuantizationScheme` /
`QuantizationConfig`, `PackedQuantizationCompressor` and `TransformConfig` / `TransformScheme` /
`TransformArgs`, and its `ModelCompressor.update_config` for config.json):

- every RoSTE-quantized linear as `weight_packed` (int32, eight 4-bit codes per word), `weight_scale`,
  `weight_shape` (+ packed `weight_zero_point` for asymmetric weights). The integer codes are exactly
  the RoSTE packed codes (checked by decompressing every layer with compressed-tensors and comparing
  with hf_roste's dequantized weight, bit for bit);
- `config_groups.group_0`: weights (`channel` or `group` strategy) and, when activations are
  quantized, dynamic symmetric per-token `input_activations`; `ignore` lists every other Linear
  (lm_head and `modules_to_not_convert`);
- `kv_cache_scheme`: dynamic symmetric per-token int K/V (compressed-tensors applies it to
  `[batch, heads, seq, head_dim]` states, i.e. per token per head, RoSTE's granularity);
- `transform_config.config_groups.R4`: the online Hadamard on the input of the down_proj layers that
  have R4 on (`location: input`), and its inverse already fused into those weights
  (`location: weight_input, inverse: true`, informational: offline transforms are not re-applied
  by loaders). The transform matrix is also stored as `<down_proj>.R4_input.weight` (unnormalised
  +-1 entries; the loaders divide by sqrt(n)), which is how vLLM loads online transforms. Sizes that
  are powers of two use the `hadamard` type (Sylvester, vLLM's fast kernel). Other sizes (e.g. 4864,
  14336) can only be declared `random-hadamard`, which compressed-tensors' loader regenerates as
  `diag(q) H` (H our matrix, q signs from its unseeded generator) instead of reading the stored
  matrix. The export builds that same matrix, stores it, and negates the up-projection rows where
  `q = -1` (exact for symmetric integer codes), so `diag(q)` cancels in `act(gate) * up`. Per-layer
  mixed R4 is expressed with explicit module names as targets;
- R1 and R2 need nothing: they are fused into the weights (embeddings and lm_head hold R1, so the
  exported config unties the embeddings).

Only what the format can express is exported. `check_exportable(config, model)` returns the reasons
a model cannot be exported, each naming the RoSTEConfig setting that would make it exportable:

- asymmetric activations or K/V (`activation_symmetric=True`, `kv_symmetric=True`): compressed-tensors'
  dynamic activations are symmetric in the kernels that serve them;
- 2- or 3-bit weights (`weight_bits=4` or `8`): vLLM's packed int kernels take 4 and 8 bits;
- online R3 with quantized K/V (`rotations` without `"R3"`): vLLM does not apply `q_attn`/`k_cache`
  transforms. With `kv_bits=16`, R3 cancels exactly in `Q K^T` and is dropped;
- the clip ratio of dynamic activations / K/V: compressed-tensors computes a dynamic symmetric scale
  as `amax / ((2^b - 1) / 2)` (e.g. amax / 7.5 for 4 bits) and clamps codes to `[-2^(b-1), 2^(b-1)-1]`;
  RoSTE's symmetric scale is `c * amax / (2^(b-1) - 1)`. They are the same quantizer exactly when
  `c = (2^(b-1) - 1) / (2^(b-1) - 1/2)` (14/15 = 0.9333... for 4 bits, 254/255 for 8 bits). Any other
  clip ratio is refused (or, with `strict=False`, exported with a warning: the served activations are
  then quantized with compressed-tensors' rule, not the trained one). Weight clip ratios are always
  exact (weight scales are stored). Caveat, measured: even at that clip ratio the two scales can
  differ by one float ulp (`amax * (c / 7)` vs `amax / 7.5`), and a token whose largest magnitude is
  negative sits exactly on the rounding tie `-7.5`, so that one element may become -7 in one
  implementation and -8 in the other. Dynamic activations are therefore "the same rule", not bit-exact;
- K/V granularity: RoSTE quantizes K/V per token per head. The `kv_cache_scheme` written says
  dynamic symmetric `token`; compressed-tensors' reference hooks (used by transformers) reduce a
  4-D `[batch, heads, seq, head_dim]` state over everything but the first two dims, i.e. ONE scale
  per head over the whole sequence. transformers therefore does not reproduce RoSTE's K/V quantizer;
  what a serving engine does depends on its own KV-cache setting (not verified here: no vLLM);
- asymmetric weights: compressed-tensors stores packed zero points, which fit when every RoSTE zero
  point `z` lies in `[0, 2^b - 1]` (checked per layer; otherwise the export names the layer and
  suggests `weight_symmetric=True`). But transformers 5.23-5.24 + compressed-tensors 0.20 cannot LOAD
  packed zero points (its meta-device skeleton keeps `[out, groups]` and the load stops on the size
  mismatch; measured), so asymmetric weights are refused unless `strict=False`;
- LayerNorm families (GPT-NeoX): RoSTE turns their LayerNorms into RMSNorms to fuse R1, which the
  plain architecture cannot express (`model.dequantize()` gives a full-precision model instead);
- an online R4 on a down_proj with a bias (vLLM's transform path takes bias-free layers only).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import RoSTEConfig
from ..folders import is_roste_checkpoint
from ..numerics import dequantize, from_unsigned, unpack_codes

logger = logging.get_logger(__name__)

TRANSFORM_NAME = "R4"
SUMMARY_FILE = "roste_export.json"


class ExportError(ValueError):
    """The model uses an option the compressed-tensors format (or its serving engines) cannot express."""


def exact_dynamic_clip_ratio(bits: int) -> float:
    """The RoSTE clip ratio whose symmetric dynamic quantizer equals compressed-tensors' (see module doc)."""
    half = 1 << (bits - 1)
    return (half - 1) / (half - 0.5)


def _clip_matches(clip: float, bits: int) -> bool:
    return math.isclose(clip, exact_dynamic_clip_ratio(bits), rel_tol=0, abs_tol=1e-6)



def _dynamic_problems(prefix: str, asym_text: str, scale_text: str, bits: int, symmetric: bool, clip: float,
                      strict: bool, clip_suffix: str) -> list[str]:
    """What keeps a dynamically quantized tensor (activations or K/V, field prefix `prefix`) from exporting."""
    if bits >= 16:
        return []
    problems = []
    if not symmetric:
        problems.append(f"{asym_text}; train with RoSTEConfig({prefix}_symmetric=True).")
    if bits not in (4, 8):
        problems.append(f"{prefix}_bits={bits}: use RoSTEConfig({prefix}_bits=4) or 8 (or 16).")
    if strict and not _clip_matches(clip, bits):
        c = exact_dynamic_clip_ratio(bits)
        problems.append(
            f"{prefix}_clip_ratio={clip}: {scale_text} as amax/{(2 ** bits - 1) / 2}; that equals RoSTE's quantizer "
            f"only with RoSTEConfig({prefix}_clip_ratio={c!r}). Train with it, or export with strict=False "
            f"(hf-roste export --non-strict){clip_suffix}."
        )
    return problems

def check_exportable(config: RoSTEConfig, model: nn.Module | None = None, *, strict: bool = True) -> list[str]:
    """Reasons the model cannot be exported (empty when it can). Each names the option and the fix."""
    if config.weight_format != "int" or config.activation_format != "int":
        return [f"weight_format={config.weight_format!r} / activation_format={config.activation_format!r}: FP4 models "
                "are exported by hf_roste.export.compressed_tensors_fp4.export_compressed_tensors_fp4 "
                "(nvfp4-pack-quantized / mxfp4-pack-quantized); this export writes int pack-quantized."]
    problems = []
    if config.weight_bits not in (4, 8):
        problems.append(
            f"weight_bits={config.weight_bits}: pack-quantized int weights are served with 4 or 8 bits; "
            "train with RoSTEConfig(weight_bits=4) (or 8)."
        )
    if strict and config.weight_bits < 16 and not config.weight_symmetric:
        problems.append(
            "asymmetric weights (weight_symmetric=False): the format stores packed zero points, but transformers "
            "5.23-5.24 with compressed-tensors 0.20 cannot load them (it expects unpacked [out, groups] zero points and "
            "stops with a size mismatch; measured). Train with RoSTEConfig(weight_symmetric=True), or export with "
            "strict=False (hf-roste export --non-strict) for engines that read packed zero points."
        )
    # a vllm-* target's activation clip is vLLM's own rule (checked by target_problems below)
    vllm_target = config.target is not None and config.target.startswith("vllm-")
    problems += _dynamic_problems(
        "activation", "asymmetric activations (activation_symmetric=False): compressed-tensors' dynamic per-token "
        "activations are served symmetric", "dynamic activation scales are computed by the serving engine",
        config.activation_bits, config.activation_symmetric, config.activation_clip_ratio, strict and not vllm_target,
        " to accept the engine's rule")
    problems += model_problems(config, model, strict=strict, power_of_two_r4=False)
    return problems


def model_problems(config: RoSTEConfig, model: nn.Module | None, *, strict: bool, power_of_two_r4: bool) -> list[str]:
    """The checks every compressed-tensors export (int and FP4) shares: K/V scheme, serving target, LayerNorm
    families, the online R4 (bias-free; a power of two when `power_of_two_r4`, else also a non-power-of-two
    size with an up projection to carry the loader's row signs) and R3 with quantized K/V."""
    problems = []
    if config.kv_format != "fp8_e4m3":
        problems += _dynamic_problems(
            "kv", "asymmetric K/V cache (kv_symmetric=False): the kv_cache_scheme is served symmetric",
            "dynamic K/V scales are computed", config.kv_bits, config.kv_symmetric, config.kv_clip_ratio, strict, "")
    if config.target is not None:
        from ..targets import target_problems

        problems += target_problems(config.target, config)
    rc = config.rotation_config
    if model is not None:
        from ..state import get_state

        state = get_state(model)
        rc = state.applied
        adapter = state.adapter
        if adapter.norm_kind == "layernorm":
            problems.append(
                f"model_type {model.config.model_type!r}: RoSTE turned its LayerNorms into RMSNorms to fuse R1, "
                "which the plain architecture cannot load; use model.dequantize() for a full-precision export."
            )
        if any(f["R4"] for f in rc["layers"]):
            down = adapter.get(adapter.decoder_layers(model)[0], adapter.down_proj)
            if getattr(down, "bias", None) is not None:
                problems.append(
                    f"online R4 on a {adapter.down_proj} with a bias: vLLM's online transforms take bias-free "
                    "layers; train with RoSTEConfig(rotations=('R1', 'R2', 'R3')) (no R4)."
                )
            size = config.r4_block_size or down.in_features
            if size & (size - 1) and power_of_two_r4:
                problems.append(
                    f"online R4 of size {size}: the FP4 export writes power-of-two R4 only; train with a power-of-two "
                    "RoSTEConfig(r4_block_size=...) (e.g. 16, the NVFP4 block) or "
                    "RoSTEConfig(rotations=('R1', 'R2', 'R3')) (no R4)."
                )
            elif size & (size - 1) and adapter.up_proj is None:
                problems.append(
                    f"online R4 of size {size} (not a power of two) on a model without a separate up projection: "
                    "compressed-tensors names such a transform 'random-hadamard' and regenerates it with its own "
                    "row signs, which hf_roste compensates in the up projection; train with "
                    "RoSTEConfig(rotations=('R1', 'R2', 'R3')) (no R4)."
                )
    layer_flags = rc["layers"] if rc is not None else [config.default_layer_flags()]
    if config.kv_bits < 16 and any(f["R3"] for f in layer_flags):
        problems.append(
            "online R3 (Hadamard on Q and K before K/V quantization): serving engines do not apply q_attn/k_cache "
            "transforms; train with RoSTEConfig(rotations=('R1', 'R2', 'R4')) (no R3)."
        )
    return problems


def _load(model_or_dir):
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.fspath(model_or_dir)).eval()


def _hadamard_weight(n: int, dtype: torch.dtype) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(`TransformScheme.type`, unnormalised matrix, row signs) of the online R4 of size n as loaders build it.

    Powers of two: compressed-tensors' Sylvester matrix, equal to ours (signs None). Other sizes can
    only be declared `random-hadamard`, which compressed-tensors regenerates as `diag(q) H` with H our
    matrix and q a sign vector drawn from an unseeded `torch.Generator()` (its factory's). That
    matrix is built here the same way and stored; the export negates the up-projection rows where
    `q = -1` so that `diag(q)` cancels (the down projection's input is `act(gate) * up`).
    """
    from ..numerics.hadamard import hadamard_matrix

    h = torch.round(hadamard_matrix(n).double() * math.sqrt(n))
    if n & (n - 1) == 0:
        from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

        if not torch.equal(deterministic_hadamard_matrix(n, torch.float64), h):
            raise ExportError(f"internal: the R4 matrix of size {n} differs from compressed-tensors' Sylvester matrix.")
        return "hadamard", h.to(dtype), None
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    # the loader's factory: TransformScheme.precision (float32, see build_transform_config), fresh generator
    theirs = random_hadamard_matrix(n, torch.float32, torch.device("cpu"), torch.Generator()).double()
    signs = torch.sign((theirs * h).sum(dim=1))
    if not torch.equal(signs[:, None] * h, theirs):
        raise ExportError(
            f"internal: compressed-tensors' random-hadamard matrix of size {n} is not a row-signed copy of hf_roste's; "
            "train with RoSTEConfig(rotations=('R1', 'R2', 'R3')) (no R4) to export this model."
        )
    return "random-hadamard", theirs.to(dtype), signs


def _negate_rows(name: str, t: dict[str, torch.Tensor] | None, rest: dict[str, torch.Tensor], rows: torch.Tensor,
                 config: RoSTEConfig) -> None:
    """Negate output rows `rows` of linear `name` exactly (packed codes, or a full-precision weight in `rest`)."""
    if t is None:
        rest[f"{name}.weight"] = rest[f"{name}.weight"].clone()
        rest[f"{name}.weight"][rows] *= -1
        if rest.get(f"{name}.bias") is not None:
            rest[f"{name}.bias"] = rest[f"{name}.bias"].clone()
            rest[f"{name}.bias"][rows] *= -1
        return
    half = 1 << (config.weight_bits - 1)
    codes = t["codes"].to(torch.int16)
    if bool((codes[rows] == 0).any()):  # signed code -half has no negation in [-half, half - 1]
        raise ExportError(
            f"{name}: a weight code at the bottom of the symmetric range cannot be negated exactly, which the "
            "random-hadamard R4 of this size needs; train with a weight_clip_ratio >= "
            f"{(half - 1) / (half - 0.5):.4f} or RoSTEConfig(rotations=('R1', 'R2', 'R3')) (no R4)."
        )
    codes[rows] = 2 * half - codes[rows]
    t["codes"] = codes.to(t["codes"].dtype)
    if t["bias"] is not None:
        t["bias"] = t["bias"].clone()
        t["bias"][rows] *= -1


def _weight_args(config: RoSTEConfig):
    from compressed_tensors.quantization import QuantizationArgs

    kw: dict[str, Any] = {"num_bits": config.weight_bits, "type": "int", "symmetric": config.weight_symmetric,
                          "dynamic": False}
    if config.weight_group_size is None:
        kw["strategy"] = "channel"
    else:
        kw.update(strategy="group", group_size=config.weight_group_size)
    return QuantizationArgs(**kw)


def _dynamic_args(bits: int):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)


def weight_format(config: RoSTEConfig) -> str:
    """`int-quantized` (int8 weights, the format vLLM's W8A8 int8 path reads) for 8-bit weights with 8-bit
    activations, else `pack-quantized` (4-bit, or 8-bit weight-only: vLLM's WNA16 path)."""
    return "int-quantized" if config.weight_bits == 8 and config.activation_bits == 8 else "pack-quantized"


def _kv_args(config: RoSTEConfig):
    """`kv_cache_scheme`: fp8 e4m3 static per KV head (`attn_head`) for kv_format fp8, else dynamic int per token."""
    if config.kv_format == "fp8_e4m3":
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=8, type="float", strategy="attn_head", symmetric=True, dynamic=False)
    return _dynamic_args(config.kv_bits)


def fp8_kv_scale_tensors(model: nn.Module, adapter, config: RoSTEConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`k_scale` / `v_scale` `[kv_heads, 1, 1]` of every attention layer: the trained static fp8 scale
    (`Fp8Spec.scale`) for every KV head (compressed-tensors `attn_head` kv_cache_scheme)."""
    _, n_kv, _ = adapter.head_layout(model)
    out = {}
    for layer_path in (f"{adapter.layers}.{i}.{adapter.attn}" for i in range(adapter.num_layers(model))):
        for which in ("k", "v"):
            out[f"{layer_path}.{which}_scale"] = torch.full((n_kv, 1, 1), config.kv_spec.scale, dtype=dtype)
    return out


def build_quantization_config(config: RoSTEConfig, ignore: list[str], targets: list[str] | None = None):
    """compressed-tensors `QuantizationConfig` of a RoSTE config (status compressed)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    fmt = weight_format(config)
    scheme = QuantizationScheme(
        targets=targets or ["Linear"],
        weights=_weight_args(config),
        input_activations=_dynamic_args(config.activation_bits) if config.activation_bits < 16 else None,
        format=fmt,  # explicit: with int activations the inferred format would be int-quantized (int8)
    )
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        kv_cache_scheme=_kv_args(config) if config.kv_bits < 16 else None,
        format=fmt,
        quantization_status="compressed",
        ignore=ignore,
    )


def build_transform_config(r4_modules: list[str], kind: str, head_dim: int | None = None):
    """compressed-tensors `TransformConfig` of the online R4 (None when no layer has it).

    `head_dim` (RoSTEConfig.r4_block_size) makes it block-diagonal: one `head_dim x head_dim` Hadamard per block.
    """
    if not r4_modules:
        return None
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    scheme = TransformScheme(
        type=kind,
        apply=[
            TransformArgs(targets=list(r4_modules), location="input"),
            TransformArgs(targets=list(r4_modules), location="weight_input", inverse=True),
        ],
        precision=torch.float32,
        head_dim=head_dim,
    )
    return TransformConfig(config_groups={TRANSFORM_NAME: scheme})


def _linear_tensors(model: nn.Module, state) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(per quantized linear: unsigned codes, scale, zero (fp32) and bias; every other tensor of the state dict),
    from a packed or QAT model."""
    from ..export.checkpoint import packed_state_dict

    sd = model.state_dict() if state.packed else packed_state_dict(model)
    out = {}
    for key in sd:
        if not key.endswith(".weight_packed"):
            continue
        prefix = key[: -len(".weight_packed")]
        module = model.get_submodule(prefix)
        out[prefix] = {
            "codes": unpack_codes(sd[key], state.config.weight_bits, module.in_features),
            "scale": sd[f"{prefix}.weight_scale"].float(),
            "zero": sd[f"{prefix}.weight_zero_point"].float(),
            "bias": sd.get(f"{prefix}.bias"),
        }
    rest = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in out}
    return out, rest


@torch.no_grad()
def _compress_linear(name: str, t: dict[str, torch.Tensor], config: RoSTEConfig, scheme) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one linear, checked bit for bit against RoSTE's dequantized weight."""
    from compressed_tensors.compressors import IntQuantizationCompressor, PackedQuantizationCompressor

    compressor = IntQuantizationCompressor if weight_format(config) == "int-quantized" else PackedQuantizationCompressor
    bits = config.weight_bits
    half = 1 << (bits - 1)  # compressed-tensors stores signed zero points: unsigned zero - half
    spec = config.weight_spec
    codes_u, scale, zero = t["codes"], t["scale"], t["zero"]
    if config.weight_symmetric:
        ours = dequantize(from_unsigned(codes_u, spec), scale, zero, spec, dtype=torch.float32)
        sd = {"weight": ours, "weight_scale": scale}
    else:
        bad = (zero < 0) | (zero > 2 * half - 1)
        if bool(bad.any()):
            raise ExportError(
                f"{name}: {int(bad.sum())} weight zero points lie outside [0, {2 * half - 1}] and cannot be stored in "
                f"compressed-tensors' signed {bits}-bit zero points; train with RoSTEConfig(weight_symmetric=True)."
            )
        ours = dequantize(codes_u, scale, zero, spec, dtype=torch.float32)
        sd = {"weight": ours, "weight_scale": scale, "weight_zero_point": (zero - half).to(torch.int8)}
    comp = compressor.compress(dict(sd), scheme)
    back = compressor.decompress(dict(comp), scheme)["weight"].float()
    if not torch.equal(back, ours):
        err = (back - ours).abs().max().item()
        raise ExportError(f"internal: {name} does not decompress to the RoSTE weight (max abs diff {err:.3g}).")
    if compressor is PackedQuantizationCompressor:
        comp = {k: v for k, v in comp.items() if k != "weight"}
    if t["bias"] is not None:
        comp["bias"] = t["bias"]
    return comp


def write_plain_config(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype) -> None:
    """`config.json` (no RoSTE quantization_config, untied embeddings, no attention override) and the
    generation config of an exported model; the caller adds the compressed-tensors section."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.tie_word_embeddings = False  # R1 is fused into the embeddings and lm_head separately
    if hasattr(cfg, "get_text_config") and cfg.get_text_config() is not cfg:
        cfg.get_text_config().tie_word_embeddings = False
    cfg.dtype = dtype
    cfg.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    raw.pop("_attn_implementation", None)
    raw.pop("attn_implementation", None)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def write_export_files(out_dir, qconfig, transform_config, file_tensors: dict[str, torch.Tensor],
                       max_shard_size, tokenizer, src_dir) -> None:
    """The compressed-tensors section of `config.json`, the weight files and the tokenizer (the one given,
    else the source folder's when it has one) of an exported model."""
    from compressed_tensors.compressors import ModelCompressor
    from huggingface_hub import save_torch_state_dict

    ModelCompressor(quantization_config=qconfig, transform_config=transform_config).update_config(out_dir)
    save_torch_state_dict(file_tensors, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    elif src_dir is not None:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(src_dir).save_pretrained(out_dir)
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("No tokenizer copied to %s (none loadable from %s: %s); pass tokenizer=... to include one.",
                           out_dir, src_dir, exc)


def export_compressed_tensors(model_or_dir, out_dir: str | os.PathLike, *, strict: bool = True,
                              tokenizer: Any = None, max_shard_size: str = "5GB") -> dict[str, Any]:
    """Write a compressed-tensors `pack-quantized` checkpoint of a RoSTE model to `out_dir`.

    Args:
        model_or_dir: a RoSTE model (packed or QAT) or a saved RoSTE folder.
        out_dir: output folder (config.json, safetensors, generation_config.json, tokenizer if found).
        strict: refuse clip ratios whose dynamic quantizer differs from compressed-tensors' (see the
            module docstring); `False` exports anyway with a warning.
        tokenizer: saved next to the model; by default the source folder's tokenizer is copied if any.

    Returns:
        a summary dict (also written to `roste_export.json`).

    Raises:
        ExportError: the model uses an option the format cannot express (the message names it).
        OutputIsSourceError: ``out_dir`` is the folder the model is read from (links resolved).
    """
    from compressed_tensors.quantization import QuantizationScheme
    from transformers.core_model_loading import revert_weight_conversion

    from ..state import get_state
    from .paths import check_output_is_not_source

    check_output_is_not_source(model_or_dir, out_dir, "export_compressed_tensors")
    src_dir = None if isinstance(model_or_dir, nn.Module) else os.fspath(model_or_dir)
    if src_dir is not None:
        if not is_roste_checkpoint(src_dir):
            raise ExportError(f"{src_dir} is not a RoSTE checkpoint (config.json has no quant_method 'roste').")
    model = _load(model_or_dir)
    state = get_state(model)
    config = state.config
    problems = check_exportable(config, model, strict=strict)
    if problems:
        raise ExportError("This RoSTE model cannot be exported to compressed-tensors:\n- " + "\n- ".join(problems))
    notes = []
    vllm_target = config.target is not None and config.target.startswith("vllm-")
    if vllm_target and config.activation_bits == 8:
        notes.append("activations: vLLM's dynamic int8 scale is amax/127, the trained rule (activation_clip_ratio=1.0); "
                     "transformers' compressed-tensors reference quantizer uses amax/127.5 instead.")
    for what in ("activation", "kv"):
        bits = getattr(config, f"{what}_bits")
        clip = getattr(config, f"{what}_clip_ratio")
        if what == "kv" and config.kv_format == "fp8_e4m3" or what == "activation" and vllm_target:
            continue
        if bits < 16 and not _clip_matches(clip, bits):
            msg = (f"{what}_clip_ratio={clip} is not expressible: the served {what} quantizer uses "
                   f"amax/{(2 ** bits - 1) / 2} (RoSTE equivalent clip {exact_dynamic_clip_ratio(bits):.6f}).")
            logger.warning(msg)
            notes.append(msg)
    if config.kv_bits == 16 and any(f["R3"] for f in state.applied["layers"]):
        notes.append("R3 dropped: with unquantized K/V it cancels exactly in Q K^T.")

    adapter = state.adapter
    quantized = set(adapter.quantized_linear_paths(model))
    linears, rest = _linear_tensors(model, state)
    quantized &= set(linears)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    ignore += sorted(n for n in quantized - set(linears))
    weights_scheme = QuantizationScheme(targets=["Linear"], weights=_weight_args(config))

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tensors: dict[str, torch.Tensor] = {}
    r4_layers = [i for i, flags in enumerate(state.applied["layers"]) if flags["R4"]]
    r4_modules = [f"{adapter.layers}.{i}.{adapter.down_proj}" for i in r4_layers]
    transform_config, kind, h = None, None, None
    if r4_modules:
        size = adapter.get(adapter.decoder_layers(model)[0], adapter.down_proj).in_features
        block = config.r4_block_size
        kind, h, signs = _hadamard_weight(block or size, dtype)
        transform_config = build_transform_config(r4_modules, kind, head_dim=block)
        if kind != "hadamard":
            notes.append(f"R4 written as a dense {kind} matrix of {size}x{size} ({size * size * 4 / 2**20:.1f} MiB in "
                         "fp32 per layer in vLLM); no power-of-two block was set (RoSTEConfig.r4_block_size).")
        if signs is not None:  # cancel the loader's row signs in the up projections feeding those layers
            rows = (signs < 0).nonzero().flatten()
            up = adapter.up_proj
            for i in r4_layers:
                name = f"{adapter.layers}.{i}.{up}"
                _negate_rows(name, linears.get(name), rest, rows, config)
            notes.append(f"R4 of size {size} exported as compressed-tensors' random-hadamard matrix; its row signs "
                         f"are compensated in {up} ({len(rows)} rows negated per layer).")
    for k, v in rest.items():
        if v.dtype == torch.uint8 and v.numel() == 0:
            continue  # the packed layers' empty `weight` marker
        tensors[k] = v
    from ..progress import progress

    for name, t in progress(linears.items(), "export compressed-tensors", total=len(linears), unit="tensor"):
        for leaf, v in _compress_linear(name, t, config, weights_scheme).items():
            tensors[f"{name}.{leaf}"] = v
    for name in r4_modules:
        tensors[f"{name}.{TRANSFORM_NAME}_input.weight"] = h  # shared storage: one copy per layer is written
    if config.kv_bits < 16 and config.kv_format == "fp8_e4m3":
        tensors.update(fp8_kv_scale_tensors(model, adapter, config, dtype))
    file_tensors = revert_weight_conversion(model, tensors)
    file_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in file_tensors.items()}

    os.makedirs(out_dir, exist_ok=True)
    write_plain_config(model, out_dir, dtype)
    qconfig = build_quantization_config(config, ignore)
    if config.target is not None and config.target.startswith("vllm-"):
        from .vllm import vllm_problems

        refused = vllm_problems(qconfig.model_dump(mode="json"))
        if refused:
            raise ExportError(f"RoSTE target {config.target!r} exported something vLLM would not run:\n- "
                              + "\n- ".join(refused))
    write_export_files(out_dir, qconfig, transform_config, file_tensors, max_shard_size, tokenizer, src_dir)
    summary = {
        "format": f"compressed-tensors {weight_format(config)}",
        "scheme": config.scheme_name,
        "quantized_linears": len(linears),
        "ignore": ignore,
        "r4_layers": len(r4_modules),
        "r4_transform_type": kind,
        "r4_block_size": config.r4_block_size if r4_modules else None,
        "target": config.target,
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
