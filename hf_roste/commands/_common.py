"""Helpers shared by the `sft`, `search` and `eval` subcommands."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CommandError(Exception):
    """A user error: printed as `hf-roste CMD: error: ...`, exit code 2."""


def fail(command: str, message: str) -> int:
    print(f"hf-roste {command}: error: {message}", file=sys.stderr)
    return 2


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto" if name == "auto" else None
    if name not in DTYPES:
        raise CommandError(f"--dtype {name!r} is invalid: expected one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


def is_roste_checkpoint(path: str) -> bool:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    with open(cfg_path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    return qc.get("quant_method") == "roste"


def load_model(path: str, *, quantization_config=None, dtype: str | None = None, attn_implementation: str | None = None,
               revision: str | None = None):
    """`from_pretrained` after `import hf_roste` (RoSTE checkpoints come back as QAT models)."""
    from transformers import AutoModelForCausalLM

    import hf_roste  # noqa: F401  (registers quant_method "roste")

    kwargs: dict[str, Any] = {}
    td = torch_dtype(dtype)
    if td is not None:
        kwargs["dtype"] = td
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision:
        kwargs["revision"] = revision
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_path_or_hub_id(command: str, flag: str, value: str) -> None:
    """A value that looks like a local path (./x, /x, x.jsonl) but does not exist is a user error."""
    looks_local = value.startswith((".", "/", "~")) or os.path.splitext(value)[1] in (".json", ".jsonl", ".parquet",
                                                                                      ".csv", ".arrow")
    if looks_local and not os.path.exists(os.path.expanduser(value)):
        raise CommandError(f"{flag} {value!r} does not exist: pass an existing local path or a Hub id.")
