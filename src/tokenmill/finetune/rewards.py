"""Reward functions: a registry of named verifiable rewards, user functions by `module:function`, weighted sums.

Every reward has TRL's calling shape (https://huggingface.co/docs/trl/grpo_trainer#using-a-custom-reward-function):

    fn(prompts: list[str], completions: list[str], **fields) -> list[float | None]

`fields` holds one list per column, aligned with `completions`: the task's columns (`answer`, and for mcq
`options`), `completion_ids` (the sampled token ids) and `finish_reason` ("stop" when the model emitted EOS,
"length" when it ran out of tokens). A function should accept `**kwargs` and ignore what it does not need.
None means "this reward does not apply to this sample" and counts as 0 in the weighted sum.

A reward that raises, returns the wrong number of values or a value that is not a finite number stops the run
with one line naming the function, because a silently wrong reward trains the wrong behaviour.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import UserError

RewardFn = Callable[..., list[float | None]]
MCQ_LETTER = re.compile(r"\b([A-J])\b")  # the first standalone capital letter A-J is the chosen option


def position_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Partial credit: the share of the answer's characters that the completion has at the same position."""
    return [
        sum(a == c for a, c in zip(ans, text, strict=False)) / max(1, len(ans))
        for text, ans in zip(completions, answer, strict=True)
    ]


def exact_eos(
    prompts: list[str], completions: list[str], answer: list[str], finish_reason: list[str], **_: Any
) -> list[float]:
    """1 when the completion is exactly the answer and the model ended it itself (EOS), else 0."""
    return [
        float(text == ans and reason == "stop")
        for text, ans, reason in zip(completions, answer, finish_reason, strict=True)
    ]


def exact(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1 when the completion, without surrounding whitespace, is exactly the answer."""
    return [float(text.strip() == ans.strip()) for text, ans in zip(completions, answer, strict=True)]


def mcq_letter(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1 when the first option letter (A-J, standing alone) in the completion is the correct one."""
    scores = []
    for text, ans in zip(completions, answer, strict=True):
        found = MCQ_LETTER.search(text)
        scores.append(float(found is not None and found.group(1) == ans.strip().upper()))
    return scores


REWARDS: dict[str, RewardFn] = {
    "position_match": position_match,
    "exact_eos": exact_eos,
    "exact": exact,
    "mcq_letter": mcq_letter,
}


@dataclass(frozen=True)
class WeightedReward:
    name: str  # the registry name or module:function, as given
    fn: RewardFn
    weight: float


def parse_reward(spec: str) -> WeightedReward:
    """`name`, `name:weight`, `module:function` or `module:function:weight` -> the function and its weight."""
    text = spec.strip()
    name, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and _is_number(tail):
        name, weight = head, float(tail)
    if not math.isfinite(weight):
        raise UserError(f"rl.rewards entry {spec!r} has a weight that is not a finite number")
    if name in REWARDS:
        return WeightedReward(name, REWARDS[name], weight)
    if ":" in name:
        return WeightedReward(name, load_user_reward(name), weight)
    raise UserError(
        f"rl.rewards entry {spec!r} names no reward: choose one of {', '.join(sorted(REWARDS))}, "
        f"or give your own as module:function (optionally :weight)"
    )


def load_user_reward(spec: str) -> RewardFn:
    """Import `module:function` (the module must be importable: installed, or on PYTHONPATH)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing at import time
        raise UserError(
            f"reward {spec}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
            f"put it on PYTHONPATH or install it"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward {spec}: module {module_name!r} has no function {attr!r}")
    return fn


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_rewards(specs: Sequence[str]) -> list[WeightedReward]:
    rewards = [parse_reward(spec) for spec in specs]
    if not rewards:
        raise UserError("rl.rewards is empty: name at least one reward, e.g. --rl.rewards=[exact]")
    return rewards


def score(
    rewards: Sequence[WeightedReward],
    prompts: list[str],
    completions: list[str],
    fields: Mapping[str, list[Any]],
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted sum per completion, each reward's values with None as 0), after checking every value."""
    total = [0.0] * len(completions)
    each: dict[str, list[float]] = {}
    for reward in rewards:
        values = call_reward(reward, prompts, completions, fields)
        each[reward.name] = values
        total = [t + reward.weight * v for t, v in zip(total, values, strict=True)]
    return total, each


def call_reward(
    reward: WeightedReward, prompts: list[str], completions: list[str], fields: Mapping[str, list[Any]]
) -> list[float]:
    """One reward function's values (None -> 0.0), or a UserError naming what it did wrong."""
    try:
        values = reward.fn(prompts=prompts, completions=completions, **fields)
    except Exception as err:
        raise UserError(
            f"reward function {reward.name} raised {type(err).__name__}: {err}; fix it (it is called as "
            f"fn(prompts, completions, **fields) with fields {', '.join(sorted(fields))})"
        ) from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise UserError(
            f"reward function {reward.name} returned {got} for {len(completions)} completions; "
            f"return one float (or None) per completion"
        )
    out = []
    for value in values:
        if value is None:
            out.append(0.0)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            out.append(float(value))
        else:
            raise UserError(
                f"reward function {reward.name} returned {value!r}; return a finite float (or None) per completion"
            )
    return out
