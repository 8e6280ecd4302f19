"""Model cards and Hub uploads of exported models (compressed-tensors folders for vLLM, GGUF files for llama.cpp).

    from hf_roste.export.export_card import render_export_card, push_export
    push_export("my-model-q4_0.gguf", "me/my-model-GGUF", base_model="Qwen/Qwen2.5-0.5B")

The card (template `model_cards/roste_export_card.md.j2`) names the serving target, the engine command line
(`vllm serve ...` / `llama-cli -m ...`), the quantization of each tensor kind, the base model with
`base_model_relation: quantized`, and the export notes. The RoSTE config is read back from what the export
wrote: `roste_export.json` of a compressed-tensors folder, the `hf_roste.config` key of a GGUF file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import yaml

from ..config import RoSTEConfig

__all__ = ["EXPORT_TEMPLATE", "export_config", "push_export", "render_export_card"]

EXPORT_TEMPLATE = "roste_export_card.md.j2"
GGUF_CONFIG_KEY = "hf_roste.config"


def export_config(path: str | os.PathLike) -> tuple[RoSTEConfig, dict[str, Any], str]:
    """(RoSTE config, export summary, format) of an exported folder (compressed-tensors) or `.gguf` file."""
    path = os.fspath(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        import gguf

        reader = gguf.GGUFReader(path)
        field = reader.fields.get(GGUF_CONFIG_KEY)
        if field is None:
            raise ValueError(f"{path} has no {GGUF_CONFIG_KEY} metadata: it was not written by hf_roste's export_gguf.")
        data = json.loads(bytes(field.parts[-1]).decode())
        return RoSTEConfig.from_dict(data["roste_config"]), data["summary"], "gguf"
    summary_file = os.path.join(path, "roste_export.json")
    if not os.path.isfile(summary_file):
        raise ValueError(f"{path} is neither a .gguf file nor a folder written by hf-roste export (no roste_export.json).")
    with open(summary_file, encoding="utf-8") as f:
        summary = json.load(f)
    if "roste_config" not in summary:
        raise ValueError(f"{summary_file} predates serving targets (no roste_config); export the model again.")
    return RoSTEConfig.from_dict(summary["roste_config"]), summary, "compressed-tensors"


def _rows(config: RoSTEConfig, fmt: str, summary: dict[str, Any]) -> list[dict[str, str]]:
    group = "per output channel" if config.weight_group_size is None else f"groups of {config.weight_group_size}"
    if fmt == "gguf":
        wfmt = "GGUF Q4_0" if config.weight_bits == 4 else "GGUF Q8_0"
        return [
            {"tensor": "linear weights", "format": f"{wfmt} (int{config.weight_bits} symmetric, fp16 scales)",
             "granularity": group, "note": "trained codes, not re-quantized"},
            {"tensor": "activations", "format": "llama.cpp's own 8-bit blocks", "granularity": "blocks of 32",
             "note": "full precision in training"},
            {"tensor": "K/V cache", "format": "f16 (llama.cpp default)", "granularity": "-", "note": ""},
            {"tensor": "embeddings, lm_head", "format": "F16", "granularity": "-", "note": "norms and biases F32"},
        ]
    if config.weight_format != "int":  # FP4 export (hf_roste.export.compressed_tensors_fp4)
        fp4 = {"nvfp4": ("NVFP4 (e2m1)", "blocks of 16, fp8 e4m3 block scales + fp32 global scale"),
               "mxfp4": ("MXFP4 (e2m1)", "blocks of 32, e8m0 power-of-two scales")}
        wfmt, wgran = fp4[config.weight_format]
        rows = [{"tensor": "linear weights", "format": wfmt, "granularity": wgran,
                 "note": f"{config.weight_format}-pack-quantized"}]
        act = summary.get("activations")
        if act in fp4:
            note = ("static input_global_scale calibrated at export; block scales dynamic" if act == "nvfp4"
                    else "dynamic block scales")
            rows.append({"tensor": "activations", "format": fp4[act][0], "granularity": fp4[act][1], "note": note})
        elif act == "int":
            rows.append({"tensor": "activations", "format": f"int{config.activation_bits} dynamic symmetric",
                         "granularity": "per token", "note": ""})
        else:
            rows.append({"tensor": "activations", "format": "bf16/fp16", "granularity": "-",
                         "note": "weight-only export" if config.activation_bits < 16 else ""})
    else:
        rows = [{"tensor": "linear weights", "format": f"int{config.weight_bits} symmetric", "granularity": group,
                 "note": "pack-quantized" if config.weight_bits == 4 or config.activation_bits == 16
                 else "int-quantized"}]
        if config.activation_bits < 16:
            rows.append({"tensor": "activations", "format": f"int{config.activation_bits} dynamic symmetric",
                         "granularity": "per token", "note": f"clip ratio {config.activation_clip_ratio}"})
        else:
            rows.append({"tensor": "activations", "format": "bf16/fp16", "granularity": "-", "note": ""})
    if config.kv_bits < 16:
        kv = "fp8 e4m3, static scale 1.0" if config.kv_format == "fp8_e4m3" else f"int{config.kv_bits} dynamic"
        rows.append({"tensor": "K/V cache", "format": kv, "granularity": "per KV head", "note": ""})
    else:
        rows.append({"tensor": "K/V cache", "format": "bf16/fp16", "granularity": "-", "note": ""})
    return rows


def render_export_card(path: str | os.PathLike, *, repo_id: str, base_model: str | None = None,
                       license: str | None = None, title: str | None = None) -> str:
    """README.md text for an exported folder / GGUF file `path` (read with `export_config`)."""
    import jinja2

    from .._version import __version__
    from ..targets import TARGETS
    from .model_card import template_dir

    config, summary, fmt = export_config(path)
    target = TARGETS.get(config.target or "")
    name = os.path.basename(os.fspath(path)) if fmt == "gguf" else repo_id
    if target is not None:
        serve = target.serve_command.format(model=name if fmt == "gguf" else repo_id)
        engine, hardware, parallelism = target.engine, target.hardware, target.parallelism
    else:
        serve = f"llama-cli -m {name}" if fmt == "gguf" else f"vllm serve {repo_id}"
        engine = "llama.cpp" if fmt == "gguf" else "vLLM / transformers (compressed-tensors)"
        hardware = parallelism = "see the engine's documentation (no serving target was set in training)"
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "gguf" if fmt == "gguf" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    if license:
        meta["license"] = license
    meta["tags"] = ["roste", "hf_roste", fmt, config.scheme_name] + ([config.target] if config.target else [])
    rotations = ", ".join(config.rotations) or "none"
    if config.r4_block_size and "R4" in config.rotations:
        rotations += f" (R4 online, block-diagonal Hadamard of {config.r4_block_size})"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir())), autoescape=False,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template(EXPORT_TEMPLATE).render(
        metadata_yaml=yaml.safe_dump(meta, sort_keys=False).strip(), title=title or repo_id.split("/")[-1],
        base_model=base_model, target=config.target or "none", export_format=fmt, engine=engine, serve_command=serve,
        hardware=hardware, parallelism=parallelism, quant_rows=_rows(config, fmt, summary), rotations=rotations,
        notes=list(summary.get("notes") or []) or ["no notes"], version=__version__, format_flag=fmt,
    )


def push_export(path: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload RoSTE export", revision: str | None = None,
                base_model: str | None = None, license: str | None = None):
    """Upload an exported folder or GGUF file with its generated card (README.md) in one commit."""
    from huggingface_hub import HfApi

    from .hub import HubPushError, _check_online, _is_connection_error, _resolve_token, _scrub

    path = os.fspath(path)
    card = render_export_card(path, repo_id=repo_id, base_model=base_model, license=license)
    _check_online()
    resolved = _resolve_token(token)
    api = HfApi(token=resolved)
    with tempfile.TemporaryDirectory(prefix="roste-export-push-") as folder:
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(folder, os.path.basename(path)))
        else:
            shutil.copytree(path, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "README.md"))
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            target = getattr(url, "repo_id", None) or repo_id
            return api.upload_folder(repo_id=target, folder_path=folder, commit_message=commit_message,
                                     revision=revision, repo_type="model")
        except Exception as exc:
            detail = _scrub(f"{type(exc).__name__}: {exc}", resolved)
            if _is_connection_error(exc):
                raise HubPushError(f"Could not reach the Hugging Face Hub ({detail}); nothing was uploaded.") from None
            raise
