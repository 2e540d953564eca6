"""Building blocks for typed config sections: a documented field helper and shared value checks.

Each section (model, data, ...) is a small dataclass living beside the code that owns it. Every field
carries a one-line `help` that doubles as CLI help and as the comment in `tokenmill config show`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from tokenmill.errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text (lists/dicts are copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its `value` and what is `allowed` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def require_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """Check that a string option names an entry of a registry."""
    names = sorted(choices)
    require(value in names, key, value, "choose one of " + ", ".join(names))


def require_positive(section: Any, prefix: str, *names: str, allow_zero: bool = False) -> None:
    """Check numeric fields are > 0 (or >= 0 with allow_zero)."""
    for name in names:
        value = getattr(section, name)
        ok = value >= 0 if allow_zero else value > 0
        require(ok, f"{prefix}.{name}", value, "must be >= 0" if allow_zero else "must be > 0")
