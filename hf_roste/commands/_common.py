"""Helpers shared by the `sft`, `search` and `eval` subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEBUG_ENV = "HF_ROSTE_DEBUG"


class CommandError(Exception):
    """A user error: printed as `hf-roste CMD: error: ...`, exit code 2."""


def fail(command: str, message: str) -> int:
    print(f"hf-roste {command}: error: {message}", file=sys.stderr)
    return 2


def debug_enabled() -> bool:
    """True when `HF_ROSTE_DEBUG` is set (to anything but 0/false/no): errors keep their traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions a bad file, path, setting or model raises deep in the stack (not bugs of a command)."""
    import yaml
    from datasets.exceptions import DatasetsError

    return ValueError, OSError, TypeError, yaml.YAMLError, DatasetsError


def describe_error(exc: BaseException) -> str:
    """One message for `exc`: its text (its type if empty), plus the underlying cause of a datasets error."""
    message = str(exc).strip() or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and type(exc).__module__.startswith("datasets") and str(cause).strip():
        message = f"{message}: {type(cause).__name__}: {str(cause).strip()}"
    return message


def run_guarded(command: str, handler: Callable[..., int], *args: Any) -> int:
    """`handler(*args)` with user errors reported as `hf-roste COMMAND: error: ...` and exit code 2.

    `CommandError` is printed as is. ValueError, OSError, TypeError, YAML and `datasets` errors from
    deeper code (the library's own checks, unreadable files, offline Hub) are printed with their
    message and a hint to set `HF_ROSTE_DEBUG=1`, which re-raises them with the traceback. Any other
    exception type is a bug and keeps its traceback.
    """
    try:
        return handler(*args)
    except CommandError as exc:
        if debug_enabled():
            raise
        return fail(command, str(exc))
    except _user_error_types() as exc:
        if debug_enabled():
            raise
        code = fail(command, describe_error(exc))
        print(f"hf-roste {command}: (set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return code


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto" if name == "auto" else None
    if name not in DTYPES:
        raise CommandError(f"--dtype {name!r} is invalid: expected one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


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


def load_model_arg(flag: str, path: str, **kwargs: Any):
    """`load_model(path, **kwargs)`; a model that cannot be found or read is a `CommandError` naming `flag`."""
    try:
        return load_model(path, **kwargs)
    except OSError as exc:
        raise CommandError(
            f"{flag} {path!r}: cannot load the model ({_first_line(exc)}). Pass a folder written by save_pretrained "
            "or a Hub id that is reachable (or already in the cache when HF_HUB_OFFLINE=1)."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def load_tokenizer(path: str, revision: str | None = None, flag: str = "--tokenizer"):
    """`AutoTokenizer.from_pretrained(path)` with a pad token; a missing tokenizer is a `CommandError` naming `flag`."""
    from transformers import AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        local = os.path.isdir(path)
        if local and not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            detail = "the folder has no tokenizer files"
        else:
            detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CommandError(
            f"Cannot load a tokenizer from {path!r}: {detail}. Save one into that folder "
            f"(tokenizer.save_pretrained(path)) or pass a tokenizer folder or Hub id with {flag}."
        ) from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_path_or_hub_id(command: str, flag: str, value: str) -> None:
    """A value that looks like a local path (./x, /x, x.jsonl) but does not exist is a user error."""
    looks_local = value.startswith((".", "/", "~")) or os.path.splitext(value)[1] in (".json", ".jsonl", ".parquet",
                                                                                      ".csv", ".arrow")
    if looks_local and not os.path.exists(os.path.expanduser(value)):
        raise CommandError(f"{flag} {value!r} does not exist: pass an existing local path or a Hub id.")


def check_output_file(flag: str, path: str) -> None:
    """An output *file* flag pointing at an existing folder is a user error."""
    if os.path.isdir(path):
        raise CommandError(f"{flag} {path!r} is a folder: pass a file path, e.g. {os.path.join(path, 'out.json')}.")


def check_output_dir(flag: str, path: str) -> None:
    """An output *folder* flag pointing at an existing file is a user error."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{flag} {path!r} is a file, not a folder: pass a folder path (it is created if missing).")


def load_dataset_arg(flag: str, name: str, config: str | None = None, split: str = "train", *,
                     split_flag: str = "--split", streaming: bool = False):
    """`load_any_dataset(name, config, split)` for a command-line flag: every failure is a `CommandError`
    naming the flag (missing split, unreadable or empty file, offline Hub), and so is an empty split."""
    from datasets.exceptions import DatasetsError

    from ..data import MissingSplitError, load_any_dataset

    check_path_or_hub_id("", flag, name)
    try:
        data = load_any_dataset(name, config, split=split, streaming=streaming)
    except MissingSplitError as exc:
        raise CommandError(
            f"{split_flag} {split}: {name} has no split {split!r} (available: {', '.join(exc.available)}). "
            f"Pass {split_flag} with one of those."
        ) from exc
    except (ValueError, OSError, DatasetsError) as exc:
        raise CommandError(f"{flag} {name}: {describe_error(exc)}") from exc
    if not streaming and hasattr(data, "__len__") and len(data) == 0:
        raise CommandError(f"{flag} {name}: split {split!r} has no examples; pass a dataset that has some.")
    return data


def add_calibration_args(p, *, required: bool, purpose: str) -> None:
    """The calibration-data flags shared by `hf-roste search` and `hf-roste export` (`purpose` ends the help)."""
    p.add_argument("--dataset", required=required, default=None,
                   help=f"Calibration data: a Hub dataset id or a local .jsonl/.json/.parquet file or folder ({purpose}).")
    p.add_argument("--dataset-config", default=None, help="Dataset configuration name (Hub datasets).")
    p.add_argument("--split", default="train", help="Dataset split (default: train).")
    p.add_argument("--samples", type=positive_int, default=128, help="Calibration examples (default: 128, the paper).")
    p.add_argument("--batch-size", type=positive_int, default=8, help="Calibration batch size (default: 8).")
    p.add_argument("--max-length", type=positive_int, default=512,
                   help="Truncate examples to this many tokens (default: 512).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the calibration draw (default: 0).")


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def calibration_batches(args, tokenizer) -> list[dict]:
    """`--samples` examples of `--dataset` drawn with `--seed` (prompt + completion, rendered conversation,
    text or pre-tokenized rows), tokenized and batched (`hf_roste.sample_calibration_batches`)."""
    import torch

    from ..data import dataset_format, example_text
    from ..rotation.calibration import sample_calibration_batches

    data = load_dataset_arg("--dataset", args.dataset, args.dataset_config, split=args.split)
    try:
        fmt = dataset_format(data.column_names)
    except ValueError as exc:
        raise CommandError(f"--dataset {args.dataset}: {exc}") from None
    if fmt != "tokenized":
        if len(data) <= args.samples:
            data = [{"text": example_text(data[i], tokenizer)} for i in range(len(data))]
        else:  # draw the indices first so only the sampled rows are rendered
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:args.samples]
            data = [{"text": example_text(data[int(i)], tokenizer)} for i in order]
    return sample_calibration_batches(data, n_samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                                      max_length=args.max_length, tokenizer=tokenizer, text_field="text")
