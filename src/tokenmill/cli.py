"""`tokenmill` command line: one sub-command per job, each owned by the module that does the work.

A command module exposes `add_arguments(parser)` and `run(args) -> int`. Commands that take a config
also accept `[CONFIG.yaml] [--preset P ...] [--section.key=value ...]`; the leftover words become
`args.overrides`. Bad input raises UserError, printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tokenmill.errors import UserError

# name -> (module owning it, one-line help, takes config overrides)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "train": ("tokenmill.train_cli", "train a model (no arguments: the embedded CPU demo)", True),
    "config": ("tokenmill.config_cli", "show the resolved config (tokenmill config show ...)", True),
    "estimate": ("tokenmill.estimate", "parameters, FLOPs, memory plan and time to a token budget", True),
    "tokenizer": ("tokenmill.data.tokenizer_cli", "train a byte-level BPE tokenizer", False),
    "prepare": ("tokenmill.data.prepare_cli", "pre-tokenize a source into memory-mapped shards", False),
    "data": ("tokenmill.data.check_cli", "data checks: tokenmill data check", True),
    "checkpoint": ("tokenmill.checkpoint_cli", "checkpoint tools: tokenmill checkpoint consolidate DIR OUT", False),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared `[CONFIG.yaml] [--preset P]` arguments; overrides are collected from leftovers."""
    parser.add_argument("config_file", nargs="?", default=None, metavar="CONFIG.yaml",
                        help="YAML config file (applied after presets, before overrides)")
    parser.add_argument("--preset", action="append", default=[], metavar="P",
                        help="preset name; repeat or comma-separate to combine (size + architecture)")


def presets_from_args(args: argparse.Namespace) -> list[str]:
    return [name for item in args.preset for name in item.split(",") if name]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (module_name, help_text, takes_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_module=module, _takes_config=takes_config)
        parsers[name] = p
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # `tokenmill` alone runs the embedded demo
    parser, parsers = build_parser()
    debug = "--debug" in argv
    try:
        args, extras = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if extras and not args._takes_config:
            parsers[args.command].error(f"unrecognised arguments: {' '.join(extras)}")
        from tokenmill.config import split_overrides

        args.overrides = split_overrides(extras) if args._takes_config else []
        return int(args._module.run(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
