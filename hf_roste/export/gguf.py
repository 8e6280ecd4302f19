"""Export a RoSTE model to GGUF for llama.cpp (and Ollama, LM Studio, llama-cpp-python).

    from hf_roste.export.gguf import export_gguf
    export_gguf("my-roste-model", "my-model-q4_0.gguf")        # or hf-roste export DIR OUT.gguf --format gguf

The file is written with the `gguf` package (llama.cpp's own Python writer) and follows what
llama.cpp's `convert_hf_to_gguf.py` writes for the same architecture (tensor names from
`gguf.get_tensor_name_map`, the same hyperparameter keys, Llama/Mistral Q and K rows permuted to
llama.cpp's rotary layout, Qwen2 unpermuted):

* every RoSTE-quantized linear becomes ``Q4_0`` (4-bit) or ``Q8_0`` (8-bit) **from the trained
  codes**: a ``Q4_0`` block is an fp16 scale ``d`` and 32 codes ``q`` in ``0..15`` with
  ``w = (q - 8) * d``, exactly RoSTE's symmetric group-32 int4 (``q`` = signed code + 8); ``Q8_0`` is
  ``d`` and 32 signed int8 codes. Nothing is re-quantized, so the scales must already be fp16 values:
  the ``llama.cpp-q4_0`` target trains with ``weight_scale_dtype="float16"``;
* embeddings, lm_head and any linear left in full precision are written ``F16`` (or ``F32`` with
  ``unquantized_dtype="f32"``); norms and biases ``F32``;
* R1 and R2 are already fused into the weights; llama.cpp has no online rotation, so models with
  online R3 or R4 are refused, as are asymmetric weights, groups other than 32, quantized
  activations or K/V below 16 bits (llama.cpp quantizes activations itself, to 8-bit blocks of 32,
  and keeps an f16 K/V cache by default), and weight scales that are not fp16 values. Each refusal
  names the ``llama.cpp-q4_0`` target, whose config avoids all of them;
* the tokenizer (byte-level BPE as ``gpt2`` with merges, or a single-character vocabulary written
  as byte-level symbols with one inert merge), its special token ids and chat template go into the metadata
  (`gguf.SpecialVocab`). Llama-3 ``llama3`` RoPE scaling is written as llama.cpp's ``rope_freqs``
  tensor, linear scaling as metadata; other RoPE scalings are refused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..config import RoSTEConfig

logger = logging.get_logger(__name__)

__all__ = ["GGUFExportError", "check_gguf_exportable", "export_gguf", "q4_0_blocks", "q8_0_blocks"]

TARGET_HINT = "train with RoSTEConfig.for_target('llama.cpp-q4_0') (hf-roste sft --target llama.cpp-q4_0)"
#: model_type -> (gguf architecture name, permute Q/K rows to llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
BLOCK = 32


class GGUFExportError(ValueError):
    """The model uses something llama.cpp's GGUF cannot run as trained (the message names the fix)."""


def check_gguf_exportable(config: RoSTEConfig, model: nn.Module | None = None) -> list[str]:
    """Reasons a RoSTE model cannot be written as GGUF (empty when it can), each naming the fix."""
    problems = []
    if config.weight_bits not in (4, 8):
        problems.append(f"weight_bits={config.weight_bits}: GGUF Q4_0/Q8_0 hold 4- or 8-bit codes; {TARGET_HINT}.")
    if not config.weight_symmetric:
        problems.append(f"asymmetric weights (weight_symmetric=False): Q4_0/Q8_0 have no zero point; {TARGET_HINT}.")
    if config.weight_group_size != BLOCK:
        problems.append(f"weight_group_size={config.weight_group_size}: Q4_0/Q8_0 blocks hold 32 weights; "
                        f"{TARGET_HINT}.")
    if config.weight_scale_dtype != "float16":
        problems.append(f"weight_scale_dtype={config.weight_scale_dtype!r}: Q4_0/Q8_0 store fp16 scales, and fp32 "
                        f"scales would be re-rounded; {TARGET_HINT} (it rounds the scales to fp16 in training).")
    if config.activation_bits < 16:
        problems.append(f"activation_bits={config.activation_bits}: llama.cpp quantizes activations itself (8-bit "
                        f"blocks of 32), not per token; {TARGET_HINT} (activations in full precision).")
    if config.kv_bits < 16:
        problems.append(f"kv_bits={config.kv_bits}: llama.cpp's K/V cache is f16 unless told otherwise and has no "
                        f"per-token-per-head integer cache; {TARGET_HINT}.")
    flags = None
    if model is not None:
        from ..state import get_state

        state = get_state(model)
        flags = state.applied["layers"]
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ARCHITECTURES:
            problems.append(f"model_type {model_type!r}: the GGUF export covers {sorted(ARCHITECTURES)} "
                            "(llama.cpp's llama and qwen2 architectures).")
        window = getattr(model.config, "sliding_window", None)
        if model_type == "mistral" and window is not None and window < model.config.max_position_embeddings:
            problems.append(f"sliding_window={window}: llama.cpp's llama architecture attends over the whole context; "
                            "export a Mistral checkpoint without a sliding window (v0.2 and later).")
    else:
        flags = config.resolved_rotation_config(1)["layers"] if config.rotation_config is None else \
            config.rotation_config["layers"]
    for name in ("R3", "R4"):
        if any(f[name] for f in flags):
            problems.append(f"online {name} is on: llama.cpp applies no online rotation; {TARGET_HINT} "
                            "(R1 and R2 only, fused into the weights).")
    return problems


def q4_0_blocks(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """GGUF Q4_0 bytes of unsigned codes `[rows, cols]` (0..15, signed + 8) and fp16-exact scales `[rows, cols/32]`.

    Block layout (llama.cpp `block_q4_0`): fp16 `d`, then 16 bytes whose low nibbles are elements 0..15
    and high nibbles elements 16..31 of the block.
    """
    rows, cols = codes.shape
    c = codes.to(torch.uint8).reshape(rows, cols // BLOCK, BLOCK)
    qs = c[..., :16] | (c[..., 16:] << 4)
    d = _fp16_bytes(scale).reshape(rows, cols // BLOCK, 2)
    return torch.cat([d, qs], dim=-1).reshape(rows, -1).numpy()


def q8_0_blocks(signed_codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """GGUF Q8_0 bytes of signed codes `[rows, cols]` (-128..127) and fp16-exact scales `[rows, cols/32]`."""
    rows, cols = signed_codes.shape
    qs = signed_codes.to(torch.int8).reshape(rows, cols // BLOCK, BLOCK).view(torch.uint8)
    d = _fp16_bytes(scale).reshape(rows, cols // BLOCK, 2)
    return torch.cat([d, qs], dim=-1).reshape(rows, -1).numpy()


def _fp16_bytes(scale: torch.Tensor) -> torch.Tensor:
    half = scale.to(torch.float16)
    if not torch.equal(half.float(), scale.float()):
        bad = int((half.float() != scale.float()).sum())
        raise GGUFExportError(f"{bad} weight scales are not fp16 values, so Q4_0/Q8_0 would change the model; "
                              f"{TARGET_HINT}.")
    return half.contiguous().view(torch.uint8)


def _permute_rows(t: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: within each head, HF's [first half, second half] interleaved in pairs."""
    shape = t.shape
    return t.reshape(n_head, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rope_metadata(writer, text_cfg, head_dim: int) -> dict[str, torch.Tensor]:
    """RoPE keys (and llama.cpp's `rope_freqs` factors for Llama-3 scaling); refuses other scalings."""
    import gguf

    params = dict(getattr(text_cfg, "rope_parameters", None) or {})
    legacy = getattr(text_cfg, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = (params.get("rope_type") or params.get("type") or "default").lower()
    if kind == "default":
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return {}
    if kind == "llama3":
        factor = float(params.get("factor", 8.0))
        low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
        old_ctx = float(params.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                factors.append(1.0)
            elif wavelen > old_ctx / low:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}
    raise GGUFExportError(f"RoPE scaling {kind!r} is not written by this exporter (default, linear and llama3 are); "
                          "convert the full-precision model with llama.cpp's convert_hf_to_gguf.py instead.")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (llama.cpp's `gpt2` vocabularies use it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _adds_bos(spec: dict, vocab: dict[str, int], bos_id: int | None) -> bool:
    """Whether the HF tokenizer puts BOS in front of a single sequence (its `post_processor` template)."""
    if bos_id is None:
        return False
    post = spec.get("post_processor") or {}
    posts = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in posts:
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            token = (first.get("SpecialToken") or {}).get("id")
            return token is not None and vocab.get(token) == bos_id
    return False


def _pre_tokenizer_name(model_type: str, vocab_size: int) -> str:
    if model_type == "qwen2":
        return "qwen2"
    if model_type == "llama" and vocab_size >= 128000:
        return "llama-bpe"
    return "default"


def _write_tokenizer(writer, tokenizer, src_dir: str | None, model_type: str, n_vocab: int) -> dict[str, Any]:
    """Tokens, types, merges, special ids and chat template; returns what was written (for the summary).

    The tokenizer files are read as saved (`tokenizer.json`, `tokenizer_config.json`): a folder's own
    files when no `tokenizer` is passed (re-loading them through `AutoTokenizer` may pick a
    model-specific class that rebuilds the vocabulary), else the files `tokenizer.save_pretrained` writes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            folder = tmp
        else:
            folder = src_dir
        return _write_tokenizer_files(writer, folder, model_type, n_vocab)


def _write_tokenizer_files(writer, folder: str, model_type: str, n_vocab: int) -> dict[str, Any]:
    import gguf

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise GGUFExportError("The tokenizer has no tokenizer.json (a slow tokenizer); save a fast tokenizer with "
                              "the model, or pass tokenizer=AutoTokenizer.from_pretrained(..., use_fast=True).")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    kind = spec["model"]["type"]
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    id_to_tok = {i: t for t, i in vocab.items()}
    decoder = (spec.get("decoder") or {}).get("type")
    if kind == "BPE" and decoder == "ByteLevel":
        mapping = None
        pre = _pre_tokenizer_name(model_type, n_vocab)
    elif kind == "WordLevel" and all(len(t) == 1 and ord(t) < 128 for t in vocab if t not in special):
        mapping = _bytes_to_unicode()  # one ASCII character per token: byte-level symbols, no merges
        pre = "default"
    else:
        raise GGUFExportError(
            f"tokenizer model {kind!r} (decoder {decoder!r}) is not written by this exporter (byte-level BPE and "
            "single-character ASCII vocabularies are); convert the tokenizer with llama.cpp's "
            "convert_hf_to_gguf.py --vocab-only and combine, or use a byte-level BPE tokenizer."
        )
    tokens, types = [], []
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in special:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(mapping[ord(tok)] if mapping is not None else tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=mapping is None, n_vocab=n_vocab)
    if mapping is not None:
        special_vocab.merges = []
    special_vocab.add_to_gguf(writer)
    if "bos" not in special_vocab.add_special_token:  # llama.cpp's own default differs by vocabulary type
        writer.add_add_bos_token(_adds_bos(spec, vocab, special_vocab.special_token_ids.get("bos")))
    if mapping is not None:
        # llama.cpp refuses a gpt2 vocabulary without merges, and gguf skips empty arrays: one inert merge of two
        # control tokens (control tokens are matched before BPE runs, so it never applies)
        controls = [t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL]
        if len(controls) < 2:
            raise GGUFExportError("A single-character vocabulary needs two special tokens (e.g. <bos>, <eos>) to be "
                                  "written for llama.cpp; add them to the tokenizer.")
        writer.add_token_merges([f"{controls[0]} {controls[1]}"])
    return {"tokenizer": "gpt2", "pre": pre, "tokens": n_vocab, "chat_template": bool(special_vocab.chat_template)}


def export_gguf(model_or_dir, out_file: str | os.PathLike, *, tokenizer: Any = None,
                unquantized_dtype: str = "f16", name: str | None = None) -> dict[str, Any]:
    """Write a RoSTE model (packed or QAT, or a saved RoSTE folder) to the GGUF file `out_file`.

    Args:
        model_or_dir: a RoSTE model or the folder it was saved to.
        out_file: the `.gguf` file to write.
        tokenizer: the tokenizer to embed; default: the one saved in the source folder.
        unquantized_dtype: `"f16"` (default, what llama.cpp's converter writes) or `"f32"` for the
            embeddings, lm_head and full-precision linears.
        name: `general.name` (default: the folder name).

    Returns:
        a summary dict (quantization per tensor kind, tokenizer, notes).

    Raises:
        GGUFExportError: the model uses something GGUF cannot hold as trained (the message names it).
    """
    import gguf

    from ..state import get_state
    from .compressed_tensors import _linear_tensors, _load

    if unquantized_dtype not in ("f16", "f32"):
        raise GGUFExportError(f"unquantized_dtype={unquantized_dtype!r}: use 'f16' or 'f32'.")
    src_dir = None if isinstance(model_or_dir, nn.Module) else os.fspath(model_or_dir)
    if src_dir is not None:
        from ..folders import is_roste_checkpoint

        if not is_roste_checkpoint(src_dir):
            raise GGUFExportError(f"{src_dir} is not a RoSTE checkpoint (config.json has no quant_method 'roste').")
    model = _load(model_or_dir)
    state = get_state(model)
    config = state.config
    problems = check_gguf_exportable(config, model)
    if problems:
        raise GGUFExportError("This RoSTE model cannot be exported to GGUF:\n- " + "\n- ".join(problems))
    if tokenizer is None and (src_dir is None or not os.path.isfile(os.path.join(src_dir, "tokenizer.json"))):
        raise GGUFExportError("GGUF files carry their tokenizer: pass tokenizer=... (or export a folder holding "
                              "tokenizer.json, e.g. saved with tokenizer.save_pretrained(folder)).")

    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = text_cfg.model_type
    arch_name, permute = ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    adapter = state.adapter
    n_layers = adapter.num_layers(model)
    n_head, n_kv, head_dim = adapter.head_layout(model)
    names = gguf.get_tensor_name_map(arch, n_layers)
    qtype = gguf.GGMLQuantizationType.Q4_0 if config.weight_bits == 4 else gguf.GGMLQuantizationType.Q8_0
    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if config.weight_bits == 4 else gguf.LlamaFileType.MOSTLY_Q8_0
    float_np = np.float16 if unquantized_dtype == "f16" else np.float32

    linears, rest = _linear_tensors(model, state)
    out_file = os.fspath(out_file)
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or os.path.basename(os.path.normpath(src_dir or out_file)).removesuffix(".gguf"))
    writer.add_context_length(int(text_cfg.max_position_embeddings))
    writer.add_embedding_length(int(text_cfg.hidden_size))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(text_cfg.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(text_cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != text_cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    n_vocab = int(text_cfg.vocab_size)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = _rope_metadata(writer, text_cfg, head_dim)
    tok_summary = _write_tokenizer(writer, tokenizer, src_dir, model_type, n_vocab)
    notes = [f"weights {ftype.name.removeprefix('MOSTLY_')} from the trained codes and fp16 scales (not re-quantized)",
             f"embeddings, lm_head and full-precision linears {unquantized_dtype.upper()}; norms and biases F32",
             "R1/R2 fused into the weights; no online rotation"]
    from .export_card import GGUF_CONFIG_KEY

    writer.add_string(GGUF_CONFIG_KEY, json.dumps({"roste_config": config.to_dict(),
                                                   "summary": {"target": config.target, "notes": notes}}))

    def gguf_name(hf_name: str) -> str:
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise GGUFExportError(f"internal: no GGUF tensor name for {hf_name} ({arch_name}).")
        return mapped

    def rows_of(hf_name: str) -> int | None:
        if not permute:
            return None
        if hf_name.endswith(("q_proj", "q_proj.weight", "q_proj.bias")):
            return n_head
        if hf_name.endswith(("k_proj", "k_proj.weight", "k_proj.bias")):
            return n_kv
        return None

    qname = "Q4_0" if config.weight_bits == 4 else "Q8_0"
    counts = {qname: 0, unquantized_dtype.upper(): 0, "F32": 0}
    for prefix, t in linears.items():
        codes, scale = t["codes"], t["scale"]
        heads = rows_of(prefix)
        if heads is not None:
            codes, scale = _permute_rows(codes, heads, head_dim), _permute_rows(scale, heads, head_dim)
        if config.weight_bits == 4:
            data = q4_0_blocks(codes, scale)
        else:
            data = q8_0_blocks(codes.to(torch.int16) - 128, scale)
        writer.add_tensor(gguf_name(prefix) + ".weight", data, raw_dtype=qtype)
        counts[qname] += 1
        if t["bias"] is not None:
            bias = t["bias"].float()
            if heads is not None:
                bias = _permute_rows(bias, heads, head_dim)
            writer.add_tensor(gguf_name(prefix) + ".bias", bias.numpy().astype(np.float32))
            counts["F32"] += 1
    for key, value in rest.items():
        if value.dtype == torch.uint8 and value.numel() == 0:
            continue  # the packed layers' empty `weight` marker
        if not value.is_floating_point():
            raise GGUFExportError(f"internal: unexpected non-float tensor {key} ({value.dtype}).")
        value = value.detach().float()
        heads = rows_of(key)
        if heads is not None:
            value = _permute_rows(value, heads, head_dim)
        if value.dim() == 1:
            writer.add_tensor(gguf_name(key), value.numpy().astype(np.float32))
            counts["F32"] += 1
        else:
            writer.add_tensor(gguf_name(key), value.numpy().astype(float_np))
            counts[unquantized_dtype.upper()] += 1
    for key, value in extra.items():
        writer.add_tensor(key, value.numpy())
        counts["F32"] += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "format": "gguf",
        "architecture": gguf.MODEL_ARCH_NAMES[arch],
        "file": out_file,
        "file_type": ftype.name,
        "tensors": counts,
        "target": config.target,
        "notes": notes,
        **tok_summary,
    }
