"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, CLI, data, checkpoint): the message says what and how to fix it.

    The CLI prints `error: <message>` on one line and exits with `exit_code`; `--debug` shows the traceback.
    """

    exit_code: int = 2


class ConfigError(UserError):
    """A config key or value that cannot be used; always names the key."""
