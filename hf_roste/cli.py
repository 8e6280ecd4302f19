"""The `hf-roste` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-roste",
        description="RoSTE quantization-aware fine-tuning (W4A4KV4) for Hugging Face models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="Run the built-in demo on a tiny model (no network, no GPU).",
        description="Builds a tiny Llama-shaped model in memory, turns it into a RoSTE W4A4KV4 QAT model, checks "
        "that the rotations preserve its full-precision function and trains it for a few steps.",
    )
    demo.add_argument("--output-dir", default="roste-demo", help="Folder for the demo's outputs (default: roste-demo).")
    demo.add_argument("--seed", type=int, default=0, help="Random seed (default: 0).")
    demo.add_argument("--steps", type=int, default=30, help="Optimizer steps of the QAT run (default: 30).")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "steps", 1) < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
