"""`tokenmill config show [CONFIG.yaml] [--preset P] [overrides]`: print the resolved YAML."""

from __future__ import annotations

import argparse

from tokenmill.cli.common import add_config_arguments, presets_from_args
from tokenmill.config import Config, load_config, preset_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=["show", "presets"], help="show: print the resolved config; presets: list shipped presets"
    )
    add_config_arguments(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(presets_from_args(args), args.config_file, args.overrides)


def run(args: argparse.Namespace) -> int:
    if args.action == "presets":
        print("\n".join(preset_names()))
        return 0
    print(config_from_args(args).to_yaml(), end="")
    return 0
