"""`hf-roste search`: the adaptive rotation search on calibration samples, as a standalone step.

    hf-roste search MODEL_DIR --dataset train.jsonl --samples 128 --output searched-model
    hf-roste search MODEL_DIR --dataset trl-lib/tldr --rotation-config rotations.json

Loads MODEL_DIR as a RoSTE QAT model (a RoSTE checkpoint keeps its own quantization config; a
full-precision model gets `RoSTEConfig` with the bits given here), draws `--samples` calibration
examples (prompt + completion, rendered conversation or text), runs `search_rotation_config`,
prints the per-layer table and saves the model (`--output`) and/or the rotation configuration JSON
(`--rotation-config`, which `hf-roste sft --rotation_config FILE` accepts).
"""

from __future__ import annotations

import argparse
import json
import os

from transformers.utils import logging

from ..config import ROTATION_NAMES, SEARCH_ALGORITHMS, SEARCH_CRITERIA
from ..folders import is_adapter_folder, roste_folder_kind
from ..numerics import SUPPORTED_BITS
from ._common import (
    DTYPES,
    CommandError,
    add_calibration_args,
    calibration_batches,
    check_output_dir,
    check_output_file,
    check_path_or_hub_id,
    load_model_arg,
    load_tokenizer,
    run_guarded,
)

logger = logging.get_logger("hf_roste.search")



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="Run the RoSTE rotation search on calibration data; save the model or the rotation config.",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_DIR", help="Model folder or Hub id (full precision or a RoSTE checkpoint).")
    add_calibration_args(p, required=True, purpose="the rotation search")
    p.add_argument("--strategy", choices=SEARCH_ALGORITHMS, default="adaptive",
                   help="'adaptive' (the paper) or 'layerwise' (also checks the mixed configuration as a whole).")
    p.add_argument("--criterion", choices=SEARCH_CRITERIA, default="paper",
                   help="'paper' (weight + input quantization error) or 'output' (error of each linear's output).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer path or Hub id (default: MODEL_DIR).")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="Load dtype (default: float32).")
    p.add_argument("--weight-bits", type=int, choices=SUPPORTED_BITS, default=4,
                   help="For a full-precision model: weight bits (default 4). A RoSTE checkpoint keeps its own.")
    p.add_argument("--activation-bits", type=int, choices=SUPPORTED_BITS, default=4, help="Activation bits (default 4).")
    p.add_argument("--kv-bits", type=int, choices=SUPPORTED_BITS, default=4, help="K/V cache bits (default 4).")
    p.add_argument("--rotations", nargs="+", choices=ROTATION_NAMES, default=list(ROTATION_NAMES),
                   help="Rotations the search may use (default: R1 R2 R3 R4).")
    p.add_argument("--output", default=None, help="Save the searched model (save_pretrained, with the tokenizer) here.")
    p.add_argument("--rotation-config", default=None, metavar="FILE",
                   help="Write the searched rotation configuration (with the measured errors) to this JSON file.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_guarded("search", _run, args)


def _run(args: argparse.Namespace) -> int:
    import hf_roste
    from hf_roste import RoSTEConfig

    if args.output is None and args.rotation_config is None:
        logger.warning("Neither --output nor --rotation-config given: the search result is only printed.")
    check_path_or_hub_id("search", "MODEL_DIR", args.model)
    check_path_or_hub_id("search", "--dataset", args.dataset)
    if args.rotation_config:
        check_output_file("--rotation-config", args.rotation_config)
    if args.output:
        check_output_dir("--output", args.output)
    if is_adapter_folder(args.model):
        raise CommandError(
            f"MODEL_DIR {args.model!r} holds LoRA adapters (adapter_config.json), not a model: a search changes the "
            "rotations fused into the base weights, which the adapters were trained against. Search the base model "
            "(hf-roste sft searches it at train start anyway), or merge the adapters (model.merge_and_unload()), save "
            "master weights (with hf_roste.save_format(model, 'master'): model.save_pretrained(DIR)) and search DIR."
        )
    kind = roste_folder_kind(args.model)
    roste = kind in ("master", "packed")
    if kind == "packed":
        raise CommandError(
            f"MODEL_DIR {args.model!r} is a packed RoSTE checkpoint: its rotations are fused into integer codes and "
            "cannot be searched again. Search the full-precision model, or a master checkpoint (a checkpoint-* "
            "folder written during training)."
        )
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    qc = None
    if not roste:
        qc = RoSTEConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits, kv_bits=args.kv_bits,
                         rotations=tuple(args.rotations), rotation_search="adaptive")
    batches = calibration_batches(args, tokenizer)
    model = load_model_arg("MODEL_DIR", args.model, quantization_config=qc, dtype=args.dtype)
    model.eval()
    result = hf_roste.search_rotation_config(model, batches, strategy=args.strategy, criterion=args.criterion)
    print(result.to_markdown())
    if args.rotation_config:
        from ..io import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.rotation_config)), exist_ok=True)
        atomic_write_text(args.rotation_config, json.dumps(result.rotation_config, indent=2, sort_keys=True) + "\n")
        print(f"rotation configuration written to {args.rotation_config}")
    if args.output:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"searched model saved to {args.output}")
    return 0
