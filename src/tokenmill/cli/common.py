"""Arguments shared by commands that take a run config: `[CONFIG.yaml] [--preset P] [--section.key=value ...]`.

Every config key is a real option, grouped by section, with the help text of its dataclass field, so
`tokenmill train --help` documents the whole config. Values stay raw strings here and are parsed as YAML by
`tokenmill.config.parse_override`, exactly like `section.key=value` words.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

OVERRIDE_PREFIX = "override:"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file, presets and one `--section.key` option per config field."""
    from tokenmill.config import Config

    parser.add_argument(
        "config_file",
        nargs="?",
        default=None,
        metavar="CONFIG.yaml",
        help="YAML config file (applied after presets, before overrides)",
    )
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="P",
        help="preset name; repeat or comma-separate to combine (size + architecture)",
    )
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        group = parser.add_argument_group(
            f"{section.name} section",
            cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else None,
        )
        for field in dataclasses.fields(cls):
            key = f"{section.name}.{field.name}"
            default = getattr(cls(), field.name)
            group.add_argument(
                f"--{key}",
                dest=OVERRIDE_PREFIX + key,
                action="append",
                default=argparse.SUPPRESS,
                metavar="V",
                help=f"{field.metadata.get('help', '')} (default: {default!r})",
            )


def presets_from_args(args: argparse.Namespace) -> list[str]:
    """Preset names from repeated or comma-separated `--preset` values; an empty one is an error, not the demo."""
    from tokenmill.errors import ConfigError

    names = [name.strip() for item in args.preset for name in item.split(",") if name.strip()]
    if args.preset and not names:
        raise ConfigError(
            f"--preset {','.join(args.preset)!r} names no preset: give a name such as tiny "
            f"(`tokenmill config presets` lists them)"
        )
    return names


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """`key=value` strings from the `--section.key` options given (the last of a repeated key wins)."""
    return [
        f"{name[len(OVERRIDE_PREFIX) :]}={values[-1]}"
        for name, values in vars(args).items()
        if name.startswith(OVERRIDE_PREFIX)
    ]
