"""Subcommands of `hf-roste`. Each module defines `register(subparsers)` adding its parser, with
`func(args) -> int` as the handler; `COMMANDS` lists them in help order."""

COMMANDS = ("demo", "sft", "search", "eval", "push", "export")
