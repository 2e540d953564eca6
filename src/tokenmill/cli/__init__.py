"""`tokenmill` command line: one sub-command per job, each a module of this package calling into the library.

A command module exposes `add_arguments(parser)` and `run(args) -> int` and imports nothing heavy at module
level, so `tokenmill --help` and quick commands start without torch. Only the chosen command's module is
imported. Commands that take a config also accept `[CONFIG.yaml] [--preset P] [--section.key=value ...]`
(and `section.key=value` words). Bad input raises UserError, printed here as one line with its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from tokenmill.errors import UserError

# name -> (module under tokenmill.cli, one-line help, takes config overrides)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "train": ("train", "train a model (no arguments: the embedded CPU demo)", True),
    "config": ("config", "show the resolved config (tokenmill config show ...)", True),
    "estimate": ("estimate", "parameters, FLOPs, memory plan and time to a token budget", True),
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer", False),
    "prepare": ("prepare", "pre-tokenize a source into memory-mapped shards", False),
    "data": ("data", "data checks: tokenmill data check", True),
    "checkpoint": ("checkpoint", "checkpoint tools: tokenmill checkpoint consolidate DIR OUT", False),
    "logs": ("logs", "analyse runs: tokenmill logs summary|plot|compare RUN...", False),
    "ablate": ("ablate", "run a grid of configs x seeds and tabulate the results", True),
    "generate": ("generate", "generate text from a run or checkpoint (KV-cache engine)", False),
    "serve": ("serve", "OpenAI-compatible HTTP server for a checkpoint (streaming, batching, playground)", False),
    "export": ("export", "write a checkpoint as a Hugging Face model folder (verified with transformers)", False),
    "import": ("hf_import", "turn a Hugging Face GPT-2/Llama/Qwen3 model into a tokenmill run folder", False),
    "eval": ("eval", "loss/perplexity/bits per byte over a data source, or lm-evaluation-harness tasks", False),
    "rl": ("rl", "GRPO fine-tuning with verifiable rewards: tokenmill rl --from CHECKPOINT --task copy", True),
    "control": ("control", "running trainings: tokenmill control list|status|save|stop|abort", False),
}


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in argv (the first word that is not an option), if it is a known one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser; only the command `only` gets its full arguments (and its module imported)."""
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (module_name, help_text, takes_config) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if name == only:
            module = importlib.import_module(f"tokenmill.cli.{module_name}")
            module.add_arguments(p)
            p.set_defaults(_module=module, _takes_config=takes_config)
        parsers[name] = p
    return parser, parsers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # `tokenmill` alone runs the embedded demo
    parser, parsers = build_parser(_command_of(argv))
    debug = "--debug" in argv
    try:
        args, extras = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if extras and not args._takes_config:
            parsers[args.command].error(f"unrecognised arguments: {' '.join(extras)}")
        if args._takes_config:
            from tokenmill.cli.common import overrides_from_args
            from tokenmill.config import split_overrides

            args.overrides = overrides_from_args(args) + split_overrides(extras)
        else:
            args.overrides = []
        return int(args._module.run(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`tokenmill logs summary | head`): stop quietly. Point stdout at devnull
        # so the interpreter's final flush does not raise again (docs.python.org/3/library/signal.html, SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
