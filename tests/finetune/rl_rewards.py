"""A reward for tests that gives random-init samples different scores, so every step has a gradient."""

from __future__ import annotations


def first_byte(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """The first character's code point modulo 256, / 255 (0 for an empty completion)."""
    return [(ord(text[0]) % 256) / 255 if text else 0.0 for text in completions]


def raises(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    raise KeyError("score")


def wrong_length(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    return [1.0]


CALLS = {"count": 0}


def stop_during_first_step(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """Asks the run in $RL_STOP_RUN to stop, as `tokenmill control stop` does, when first called in a step (the
    call before is the start-up check)."""
    import os

    from tokenmill.jobs.actions import Action
    from tokenmill.jobs.control import write_request

    CALLS["count"] += 1
    if CALLS["count"] == 2:
        write_request(os.environ["RL_STOP_RUN"], Action.STOP)
    return [0.0] * len(completions)
