"""`hf-roste export`: convert a saved RoSTE model for serving engines.

    hf-roste export out/my-model out/my-model-ct --format compressed-tensors
    hf-roste export out/my-model out/my-model-q4_0.gguf --format gguf

`gguf` writes one llama.cpp GGUF file (Q4_0/Q8_0 blocks taken from the trained codes; models
trained with `--target llama.cpp-q4_0`), see `hf_roste.export.gguf`.

FP4 models (`weight_format` nvfp4 / mxfp4, e.g. trained with `--target vllm-nvfp4`) are written as
`nvfp4-pack-quantized` / `mxfp4-pack-quantized` (see `hf_roste.export.compressed_tensors_fp4`). NVFP4
activations need one static input global scale per layer, measured on calibration data:

    hf-roste export out/my-model out/my-model-nvfp4 --dataset train.jsonl --samples 128
    hf-roste export out/my-model out/my-model-nvfp4a16 --weights-only

`compressed-tensors` writes the `pack-quantized` format (int4 codes, scales, dynamic per-token
activation and K/V schemes, the online R4 Hadamard as a `transform_config`) that vLLM and
transformers load without hf_roste. transformers (5.24) does not apply `transform_config`: a model
with an online R4 loads there without it and computes a different function (apply it with
compressed-tensors' `apply_transform_config`, serve with an engine that reads it, or train with
`rotations=("R1", "R2")`). Options the format cannot express are refused with the RoSTEConfig
setting that would make the model exportable (see `hf_roste.export.compressed_tensors`).
"""

from __future__ import annotations

import argparse
import json
import os

from ._common import (
    CommandError,
    add_calibration_args,
    calibration_batches,
    debug_enabled,
    fail,
    load_tokenizer,
)

FORMATS = ("compressed-tensors", "gguf")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="Export a saved RoSTE model for a serving engine (compressed-tensors for vLLM, gguf for llama.cpp).",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="DIR", help="A folder saved by hf_roste (packed or master checkpoint).")
    p.add_argument("output", metavar="OUT", help="Output folder (compressed-tensors) or .gguf file (gguf).")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors", help="Target format.")
    p.add_argument("--non-strict", "--allow-clip-mismatch", dest="non_strict", action="store_true",
                   help="Export options transformers cannot reproduce exactly: activation/K-V clip ratios other "
                        "than the engine's dynamic rule (served activations then use the engine's rule) and "
                        "asymmetric weights (packed zero points).")
    fp4 = p.add_argument_group("FP4 models (nvfp4 / mxfp4)")
    fp4.add_argument("--weights-only", action="store_true",
                     help="Write FP4 weights only (NVFP4A16 / MXFP4A16): activations stay in bf16/fp16 when served.")
    add_calibration_args(fp4, required=False,
                         purpose="NVFP4 activations: each layer's static input_global_scale is measured on it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.compressed_tensors import ExportError, export_compressed_tensors

    if not os.path.exists(args.model):
        return fail("export", f"DIR {args.model!r} does not exist: pass the folder written by save_pretrained "
                              "(or trainer.save_model) of a RoSTE model.")
    if not os.path.isdir(args.model):
        return fail("export", f"DIR {args.model!r} is a file, not a folder: pass the folder written by save_pretrained "
                              "(or trainer.save_model) of a RoSTE model.")
    if args.format == "gguf":
        return _run_gguf(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        return fail("export", f"OUT {args.output!r} is a file, not a folder: pass a folder path.")
    from ..export.paths import OutputIsSourceError, check_output_is_not_source

    try:
        check_output_is_not_source(args.model, args.output, "export")
    except OutputIsSourceError as exc:
        return fail("export", str(exc))
    try:
        if _is_fp4_folder(args.model):
            summary = _export_fp4(args)
        else:
            if args.weights_only or args.dataset:
                return fail("export", "--weights-only and --dataset apply to FP4 models (weight_format nvfp4 / mxfp4) "
                                      f"only; {args.model} has int weights: drop them.")
            summary = export_compressed_tensors(args.model, args.output, strict=not args.non_strict)
    except CommandError as exc:
        return fail("export", str(exc))
    except (ExportError, ValueError, OSError) as exc:
        if debug_enabled():
            raise
        return fail("export", str(exc))
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"compressed-tensors checkpoint written to {args.output}")
    return 0


def _is_fp4_folder(path: str) -> bool:
    """True when the RoSTE folder's config says FP4 weights (weight_format nvfp4 / mxfp4)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    return qc.get("quant_method") == "roste" and qc.get("weight_format", "int") != "int"


def _export_fp4(args: argparse.Namespace) -> dict:
    """The FP4 export, with calibration batches from --dataset for NVFP4 activations."""
    from ..export.compressed_tensors_fp4 import export_compressed_tensors_fp4
    from ..folders import is_roste_checkpoint

    if not is_roste_checkpoint(args.model):
        raise CommandError(f"{args.model} is not a RoSTE checkpoint (config.json has no quant_method 'roste').")
    if args.weights_only and args.dataset:
        raise CommandError("--weights-only writes no activation scheme, so --dataset (calibration) is not used: "
                           "pass one of them.")
    calibration = None
    if args.dataset:
        calibration = calibration_batches(args, load_tokenizer(args.model, flag="DIR"))
    return export_compressed_tensors_fp4(args.model, args.output, calibration=calibration,
                                         activations=not args.weights_only)


def _run_gguf(args: argparse.Namespace) -> int:
    from ..export.gguf import GGUFExportError, export_gguf

    if os.path.isdir(args.output):
        return fail("export", f"OUT {args.output!r} is a folder; --format gguf writes one file, e.g. {args.output}/model.gguf.")
    if not args.output.endswith(".gguf"):
        return fail("export", f"OUT {args.output!r} must end with .gguf (llama.cpp finds models by that suffix).")
    try:
        summary = export_gguf(args.model, args.output)
    except (GGUFExportError, ValueError, OSError) as exc:
        if debug_enabled():
            raise
        return fail("export", str(exc))
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"GGUF file written to {args.output}; run it with: llama-cli -m {args.output}")
    return 0
