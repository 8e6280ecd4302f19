"""`hf-roste demo`: the main job on its embedded default."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="Run the built-in demo on a tiny model (no network, no GPU).",
        description="Builds a tiny Llama-shaped model in memory, turns it into a RoSTE W4A4KV4 QAT model, checks "
        "that the rotations preserve its full-precision function and trains it for a few steps.",
    )
    p.add_argument("--output-dir", default="roste-demo", help="Folder for the demo's outputs (default: roste-demo).")
    p.add_argument("--seed", type=int, default=0, help="Random seed (default: 0).")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps of the QAT run (default: 30).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise SystemExit(f"hf-roste demo: error: --steps must be >= 1, got {args.steps}")
    from ..demo import run_demo

    run_demo(output_dir=args.output_dir, seed=args.seed, steps=args.steps)
    return 0
