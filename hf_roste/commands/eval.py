"""`hf-roste eval`: ROUGE, exact match or perplexity of a model on a dataset.

    hf-roste eval MODEL_DIR --task rouge --dataset trl-lib/tldr --split test   # the paper's TL;DR metric
    hf-roste eval MODEL_DIR --task exact-match --dataset test.jsonl --max-new-tokens 8
    hf-roste eval MODEL_DIR --task perplexity --dataset test.jsonl --output scores.json

MODEL_DIR may be a saved RoSTE checkpoint (evaluated with its fake quantizers, i.e. the function
it was trained with), the LoRA adapter folder of `hf-roste sft --use_peft true` (its base is
rebuilt with the saved RoSTE configuration and rotations, the adapters inside the quantizers) or a
plain full-precision model; `--quantize` turns a full-precision model into
a RoSTE W4A4KV4 model first (round-to-nearest PTQ, no rotation search: the paper's "RTN" row with
`--rotations none`). Generation is greedy with left-padded batches; ROUGE needs
`pip install hf-roste[eval]`.
"""

from __future__ import annotations

import argparse
import json
import os

from transformers.utils import logging

from ..config import ROTATION_NAMES
from ..eval_protocols import PROTOCOLS
from ..evaluation import TASKS
from ..folders import is_adapter_folder, is_roste_checkpoint, roste_folder_kind
from ._common import (
    DTYPES,
    CommandError,
    check_output_file,
    check_path_or_hub_id,
    fail,
    load_dataset_arg,
    load_model_arg,
    load_tokenizer,
    positive_int,
    run_guarded,
    torch_dtype,
)

logger = logging.get_logger("hf_roste.eval")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="Evaluate a model (RoSTE or full precision): ROUGE, exact match or perplexity.",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_DIR", help="Model folder or Hub id (RoSTE checkpoint, the LoRA adapter folder of "
                   "`hf-roste sft --use_peft true`, or full precision).")
    p.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                   help="A fixed evaluation reproducing a paper's numbers: roste-paper = the RoSTE authors' TL;DR "
                   "evaluation (first 6,528 test items, prompts truncated/left-padded to 512 tokens, greedy 32 new "
                   "tokens, summary cut after 'TL;DR:', HF-evaluate ROUGE without stemmer). Sets task, dataset, "
                   "split, sample count, lengths, stemmer and dtype; do not pass those.")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="rouge (ROUGE-1/2/L/Lsum of greedy completions), exact-match, or perplexity "
                   "(completion-only and full).")
    p.add_argument("--dataset", default=None,
                   help="Hub dataset id or local .jsonl/.json/.parquet file or folder (prompt/completion, messages; "
                   "text for perplexity).")
    p.add_argument("--dataset-config", default=None, help="Dataset configuration name (Hub datasets).")
    p.add_argument("--split", default=None, help="Dataset split (default: test; a single local file is used whole).")
    p.add_argument("--max-samples", type=positive_int, default=None, help="Evaluate the first N examples only.")
    p.add_argument("--batch-size", type=positive_int, default=8, help="Batch size (default: 8).")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="Generated tokens per example (default: 32, the authors' TL;DR setting).")
    p.add_argument("--max-length", type=positive_int, default=2048,
                   help="Truncation length: prompt tokens for generation, whole sequence for perplexity (default 2048).")
    p.add_argument("--no-stemmer", action="store_true", help="ROUGE without the Porter stemmer.")
    p.add_argument("--tokenizer", default=None, help="Tokenizer path or Hub id (default: MODEL_DIR).")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="Load dtype (default: float32).")
    p.add_argument("--device", default=None, help="Device to evaluate on, e.g. cuda (default: cuda if available).")
    p.add_argument("--quantize", action="store_true",
                   help="Load a full-precision model as a RoSTE W4A4KV4 model (RTN, rotations fixed, no search).")
    p.add_argument("--rotations", nargs="+", default=None, metavar="R",
                   help="With --quantize: rotations to apply, from R1 R2 R3 R4, or 'none' (default: all four).")
    p.add_argument("--output", default=None, metavar="FILE", help="Write the scores (and predictions) as JSON here.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return run_guarded("eval", _run, args)
    except ImportError as exc:  # an optional extra (rouge-score) is missing: the message names it
        return fail("eval", str(exc))


def resolve_device(name: str | None) -> str:
    """`--device`, checked: a real device type whose backend is available here (default: cuda if any, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cpu":
        return name
    if device.type == "meta":
        raise CommandError("--device meta holds no data and cannot evaluate: use cpu or an accelerator (cuda, mps).")
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        raise CommandError(f"--device {name}: this torch build has no {device.type} backend; use cpu, cuda or mps.")
    if not available():
        raise CommandError(
            f"--device {name}: no {device.type} device is available here (torch.{device.type}.is_available() is False). "
            "Use --device cpu, or leave --device out to pick cuda when there is one."
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise CommandError(f"--device {name}: there are only {count()} {device.type} device(s) (indices from 0).")
    return name


def _quant_config(args):
    from hf_roste import RoSTEConfig

    rotations = list(ROTATION_NAMES) if args.rotations is None else args.rotations
    if [r.lower() for r in rotations] == ["none"]:
        rotations = []
    bad = [r for r in rotations if r not in ROTATION_NAMES]
    if bad:
        raise CommandError(f"--rotations {' '.join(bad)} is invalid: choose from R1 R2 R3 R4, or 'none'.")
    return RoSTEConfig(rotations=tuple(rotations), rotation_search="all")


def _apply_protocol(args: argparse.Namespace):
    """Fill the settings a `--protocol` fixes; an explicit conflicting flag is an error. Returns the protocol."""
    if args.protocol is None:
        missing = [f for f, v in (("--task", args.task), ("--dataset", args.dataset)) if v is None]
        if missing:
            raise CommandError(f"{' and '.join(missing)} required (or --protocol NAME, e.g. --protocol roste-paper).")
        args.split = args.split or "test"
        args.dtype = args.dtype or "float32"
        return None
    proto = PROTOCOLS[args.protocol]
    fixed = {"--task": (args.task, "rouge"), "--dataset": (args.dataset, proto.dataset),
             "--split": (args.split, proto.split), "--dtype": (args.dtype, proto.dtype)}
    clash = [f"{flag} {given} (protocol: {want})" for flag, (given, want) in fixed.items()
             if given is not None and given != want]
    if args.max_samples is not None or args.no_stemmer or args.max_length != 2048 or args.max_new_tokens != 32:
        clash.append("--max-samples/--no-stemmer/--max-length/--max-new-tokens")
    if clash:
        raise CommandError(f"--protocol {proto.name} fixes these settings; drop {', '.join(clash)}.")
    args.task, args.dataset, args.split, args.dtype = "rouge", proto.dataset, proto.split, proto.dtype
    return proto


def _run(args: argparse.Namespace) -> int:
    from ..evaluation import _require_rouge, evaluate, format_table

    protocol = _apply_protocol(args)

    if args.task == "rouge":
        _require_rouge()  # fail before loading anything
    if args.rotations is not None and not args.quantize:
        raise CommandError("--rotations only applies with --quantize (a RoSTE checkpoint keeps its own rotations).")
    check_path_or_hub_id("eval", "MODEL_DIR", args.model)
    check_path_or_hub_id("eval", "--dataset", args.dataset)
    if args.output:
        check_output_file("--output", args.output)
    device = resolve_device(args.device)
    lora = roste_folder_kind(args.model) == "adapter"
    qc = None
    if args.quantize:
        if is_roste_checkpoint(args.model):
            raise CommandError(f"--quantize: {args.model} is already a RoSTE checkpoint; drop --quantize.")
        if lora:
            raise CommandError(
                f"--quantize: {args.model} holds RoSTE LoRA adapters, evaluated with the quantization they were "
                "trained with; drop --quantize."
            )
        if is_adapter_folder(args.model):
            raise CommandError(
                f"--quantize: {args.model} holds LoRA adapters, which would be added outside the quantizers of a "
                "rotated base they were not trained on. Merge them first (PeftModel.merge_and_unload(), then "
                "save_pretrained) and evaluate the merged folder with --quantize."
            )
        qc = _quant_config(args)
    dataset = load_dataset_arg("--dataset", args.dataset, args.dataset_config, split=args.split)
    tokenizer_path = args.tokenizer or args.model
    if lora and not args.tokenizer and not os.path.isfile(os.path.join(args.model, "tokenizer_config.json")):
        from ..training.lora import adapter_base_model

        tokenizer_path = adapter_base_model(args.model)[0]  # adapters saved without a tokenizer: the base's
    tokenizer = load_tokenizer(tokenizer_path)
    if lora:
        from ..training.lora import load_roste_lora_model

        model = load_roste_lora_model(args.model, dtype=torch_dtype(args.dtype))
    else:
        model = load_model_arg("MODEL_DIR", args.model, quantization_config=qc, dtype=args.dtype)
    model.to(device)
    kwargs = dict(batch_size=args.batch_size, max_samples=args.max_samples, progress=not args.no_progress)
    if args.task == "perplexity":
        kwargs["max_length"] = args.max_length
    else:
        kwargs.update(max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_length,
                      return_predictions=args.output is not None)
        if args.task == "rouge":
            kwargs["use_stemmer"] = not args.no_stemmer
    try:
        if protocol is not None:
            from ..eval_protocols import evaluate_protocol

            results = evaluate_protocol(protocol, model, tokenizer, dataset, batch_size=args.batch_size,
                                        progress=not args.no_progress, return_predictions=args.output is not None)
        else:
            results = evaluate(args.task, model, tokenizer, dataset, **kwargs)
    except ValueError as exc:
        raise CommandError(f"--dataset {args.dataset}: {exc}") from None
    kind = "RoSTE " + model.config.quantization_config.scheme_name if getattr(model, "roste", None) else "full precision"
    if lora:
        kind += " + LoRA"
    print(format_table(results, title=f"{args.task} - {args.model} ({kind})"))
    if args.output:
        report = {"task": args.task, "protocol": args.protocol, "model": args.model, "dataset": args.dataset, "split": args.split,
                  "model_kind": kind, "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"scores written to {args.output}")
    return 0
