"""The `hf-roste` command: one subcommand per module in `hf_roste/commands/`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-roste",
        description="RoSTE quantization-aware fine-tuning (W4A4KV4) for Hugging Face models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hf_roste.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sft` parses its own arguments (TRL-style YAML + overrides), so hand them over untouched.
    if argv and argv[0] == "sft" and "sft" in COMMANDS:
        return importlib.import_module("hf_roste.commands.sft").main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
