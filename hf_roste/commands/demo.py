"""`hf-roste demo`: the main job on its embedded default."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from ._common import fail, run_guarded


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="Run the built-in demo: FP SFT vs PTQ vs STE vs RoSTE on a small shipped model (no network, no GPU).",
        description="Starting from a small Llama-shaped base shipped with the package (pre-trained in full precision "
        "on a synthetic corpus), fine-tunes it on a held-out task and compares FP SFT, SFT + RTN, SFT + rotation + "
        "RTN (QuaRot-style), STE QA-SFT and RoSTE QA-SFT at W3A3KV3 (the headline: where round-to-nearest loses on "
        "this base) and W4A4KV4: completion loss, greedy exact match, checkpoint size and training time, paired "
        "over seeds, with conclusions derived from those differences. Saves, reloads and generates from the RoSTE "
        "model. Writes results.json, results.md and results.svg (rotation choices and outlier statistics included).",
    )
    p.add_argument("--output-dir", default="roste-demo", help="Folder for the demo's outputs (default: roste-demo).")
    p.add_argument("--seeds", type=int, default=None, help="Number of seeds, 0..N-1 (default: 3).")
    p.add_argument("--steps", type=int, default=None, help="Optimizer steps of every fine-tuning run (default: 160).")
    p.add_argument("--eval-prompts", type=int, default=None, help="Held-out prompts evaluated (default: 1000).")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="Calibration samples of the RoSTE rotation search (default: 16).")
    p.add_argument("--schemes", nargs="+", default=None, choices=["W3A3KV3", "W4A4KV4", "W4A8KV4"],
                   help="Bit settings, the first is the headline (default: W3A3KV3 W4A4KV4).")
    p.add_argument("--quick", action="store_true", help="Tiny sizes (for tests; about a minute).")
    p.add_argument("--base", default=None, help="Use this base checkpoint instead of the shipped one.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a heavily shared machine).")
    p.add_argument("--pretrain", action="store_true",
                   help="Regenerate the base checkpoint from scratch instead (long: about 20-40 minutes on 2 cores) "
                   "into OUTPUT_DIR/demo_base.")
    p.add_argument("--pretrain-steps", type=int, default=None, help="Pretraining steps with --pretrain (default: 2400).")
    p.set_defaults(func=run)


class DemoUsageError(SystemExit):
    """Exit code 2 (a usage error, like argparse's) whose `str()` is the message printed to stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _usage_error(message: str) -> NoReturn:
    fail("demo", message)
    raise DemoUsageError(f"hf-roste demo: error: {message}")


def run(args: argparse.Namespace) -> int:
    # every check before any side effect (set_num_threads rejects 0 with a bare RuntimeError)
    for name in ("threads", "seeds", "steps", "eval_prompts", "calibration_samples", "pretrain_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _usage_error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.schemes and len(set(args.schemes)) != len(args.schemes):
        _usage_error(f"--schemes {' '.join(args.schemes)} names a setting twice: give each at most once.")
    if args.base is not None and not args.pretrain and not os.path.isfile(os.path.join(args.base, "config.json")):
        _usage_error(f"--base {args.base!r} is not a saved model folder (no config.json): pass a folder written by "
                     "save_pretrained (e.g. by `hf-roste demo --pretrain`), or leave --base out to use the shipped base.")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        _usage_error(f"--output-dir {args.output_dir!r} is a file: pass a folder path.")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return run_guarded("demo", _run, args)


def _run(args: argparse.Namespace) -> int:
    if args.pretrain:
        from pathlib import Path

        from ..demo.pretrain import pretrain_base

        pretrain_base(Path(args.output_dir) / "demo_base", steps=args.pretrain_steps)
        return 0
    from ..demo import run_demo

    run_demo(output_dir=args.output_dir, quick=args.quick, seeds=args.seeds, steps=args.steps,
             eval_prompts=args.eval_prompts, calibration_samples=args.calibration_samples, schemes=args.schemes,
             base=args.base)
    return 0
