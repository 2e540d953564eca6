"""`tokenmill train [CONFIG.yaml] [--preset P] [overrides]`; with nothing given, the embedded CPU demo.

Seed-style shortcuts (`--lr`, `--seq-len`, ...) map onto config keys and count as overrides.
"""

from __future__ import annotations

import argparse

from tokenmill.cli.common import add_config_arguments, presets_from_args
from tokenmill.config import Config, load_config
from tokenmill.errors import ConfigError

DEMO_PRESET = "demo"

# shortcut flag -> config key (the value is type-checked like any override)
SHORTCUTS: dict[str, str] = {
    "total_tokens": "train.total_tokens",
    "max_steps": "train.max_steps",
    "batch_size": "train.micro_batch_size",
    "seq_len": "train.seq_len",
    "lr": "optim.lr",
    "out_dir": "train.out_dir",
    "seed": "train.seed",
    "grad_accum": "train.grad_accum",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    for flag, key in SHORTCUTS.items():
        parser.add_argument(
            "--" + flag.replace("_", "-"), dest=flag, default=None, metavar="V", help=f"shortcut for --{key}"
        )
    parser.add_argument("--compile", action="store_true", default=None, help="shortcut for --train.compile=true")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from the latest valid checkpoint in out_dir, or from PATH",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in an out_dir that holds another run's checkpoints (deletes them)",
    )


def config_from_train_args(args: argparse.Namespace) -> Config:
    """Presets and file as usual; with no preset and no file, the demo preset."""
    presets = presets_from_args(args)
    if not presets and args.config_file is None:
        presets = [DEMO_PRESET]
    if args.grad_accum is not None and str(args.grad_accum).strip().lstrip("+").isdigit() and int(args.grad_accum) < 1:
        raise ConfigError(
            f"--grad-accum {args.grad_accum} is not allowed: give the micro-steps per optimizer step "
            f"(>= 1); leave it out to derive them from train.global_batch_tokens"
        )
    shortcuts = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None]
    if args.compile:
        shortcuts.append("train.compile=true")
    return load_config(presets, args.config_file, shortcuts + args.overrides)


def run(args: argparse.Namespace) -> int:
    from tokenmill.train.loop import train

    cfg = config_from_train_args(args)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    return result.exit_code
