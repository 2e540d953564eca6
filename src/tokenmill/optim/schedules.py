"""LR schedules: `SCHEDULES[name](step, total_steps, warmup_steps, cfg, tokens_per_step) -> multiplier`.

A schedule returns a multiplier in [0, 1] of each param group's base LR (so Muon's matrix LR and AdamW's LR
follow the same shape). Every schedule starts with the same linear warmup:

    warmup(step) = (step + 1) / (warmup_steps + 1)      for step < warmup_steps

so the first optimizer step already moves (a multiplier of 0 would waste it) and the peak is reached at
`step == warmup_steps` (nanoGPT's `get_lr`). `step` counts optimizer steps from 0; after the last step of a
run, `step == total_steps`, where decaying schedules reach `min_lr_ratio`.

`build_scheduler` wraps one in an `LRScheduler` whose state_dict holds only numbers, for exact resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tokenmill.errors import UserError
from tokenmill.optim.config import ScheduleConfig
from tokenmill.optim.recipe import warmup_steps

Schedule = Callable[[int, int, int, ScheduleConfig, int], float]


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The warmup multiplier, or None once warmup is over."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return None


def _progress(step: int, start: int, length: float) -> float:
    """Fraction in [0, 1] of a phase of `length` steps that begins at `start`."""
    if length <= 0:
        return 1.0
    return min(max((step - start) / length, 0.0), 1.0)


def _cosine(progress: float, high: float, low: float) -> float:
    """Half-cosine from `high` (progress 0) to `low` (progress 1) (Loshchilov & Hutter 2017, SGDR)."""
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Linear warmup, then cosine from 1 to `min_lr_ratio` at `total_steps`."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    return _cosine(_progress(step, warmup_steps, total_steps - warmup_steps), 1.0, cfg.min_lr_ratio)


def linear(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Linear warmup, then a straight line from 1 to `min_lr_ratio` at `total_steps`."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    p = _progress(step, warmup_steps, total_steps - warmup_steps)
    return 1.0 + (cfg.min_lr_ratio - 1.0) * p


def constant(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Linear warmup, then 1 forever."""
    w = _warmup(step, warmup_steps)
    return 1.0 if w is None else w


def _wsd_decay_start(total_steps: int, warmup_steps: int, cfg: ScheduleConfig) -> int:
    return max(warmup_steps, total_steps - round(cfg.decay_ratio * total_steps))


def wsd(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Warmup-stable-decay: warmup, 1 until the last `decay_ratio` of the steps, then a (1 - sqrt) decay to
    `min_lr_ratio`. (1 - sqrt) beat linear cooldown in Hägele et al. 2024, "Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations", arXiv:2405.18392 (WSD itself: Hu et al. 2024, MiniCPM)."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    start = _wsd_decay_start(total_steps, warmup_steps, cfg)
    p = _progress(step, start, total_steps - start)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - math.sqrt(p))


def wsd_linear(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Warmup-stable-decay with a linear final decay (MiniCPM's original shape)."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    start = _wsd_decay_start(total_steps, warmup_steps, cfg)
    p = _progress(step, start, total_steps - start)
    return 1.0 + (cfg.min_lr_ratio - 1.0) * p


def infinite_cooldown_steps(total_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Adaptive cooldown length of the infinite schedule: max(min_cooldown_tokens / tokens_per_step, 0.7 x total_steps).

    A short run therefore keeps its LR near the peak (its cooldown ends long after the run does, and a
    cosine starts flat) while a long run decays over 70% of its steps.
    """
    if tokens_per_step <= 0:
        raise UserError(f"the infinite schedule needs tokens_per_step > 0, got {tokens_per_step}")
    return max(cfg.min_cooldown_tokens / tokens_per_step, 0.7 * total_steps)


def infinite(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, tokens_per_step: int) -> float:
    """Infinite schedule (Ibrahim et al. 2024, arXiv:2403.08763): warmup; cosine cooldown from 1 to
    `constant_lr_ratio` over the adaptive cooldown length; constant; then, if `anneal_steps` > 0, a linear anneal
    over the last `anneal_steps` from wherever the curve is (the constant, unless the cooldown is still running)
    to `min_lr_ratio`.

    When the cooldown is longer than the run the LR never reaches the constant: intended, it stays high.
    The constant phase makes any checkpoint a valid starting point to continue pretraining or to anneal.
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    cooldown = infinite_cooldown_steps(total_steps, cfg, tokens_per_step)

    def before_anneal(s: int) -> float:
        return _cosine(_progress(s, warmup_steps, cooldown), 1.0, cfg.constant_lr_ratio)

    if cfg.anneal_steps > 0:
        start = max(warmup_steps, total_steps - cfg.anneal_steps)
        if step >= start:
            high = before_anneal(start)
            return high + (cfg.min_lr_ratio - high) * _progress(step, start, total_steps - start)
    return before_anneal(step)


# The keys are SCHEDULE_NAMES in optim/config.py, the names config validation accepts (a test keeps them equal).
SCHEDULES: dict[str, Schedule] = {
    "cosine": cosine,
    "wsd": wsd,
    "wsd-linear": wsd_linear,
    "infinite": infinite,
    "constant": constant,
    "linear": linear,
}


class ScheduledLR(torch.optim.lr_scheduler.LRScheduler):
    """lr of group i at step s = base_lr_i x SCHEDULES[name](s, ...), in closed form (no accumulated error).

    `state_dict()` holds only numbers, so it loads with `weights_only=True`; resuming restores the step and
    the base LRs and re-applies the LR to the optimizer's groups.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule_cfg: ScheduleConfig, total_steps: int, tokens_per_step: int
    ) -> None:
        if schedule_cfg.name not in SCHEDULES:
            raise UserError(
                f"schedule.name={schedule_cfg.name!r} is not a schedule: choose one of " + ", ".join(SCHEDULES)
            )
        if total_steps <= 0:
            raise UserError(f"the LR schedule needs total_steps > 0, got {total_steps}")
        self.cfg = schedule_cfg
        self.fn = SCHEDULES[schedule_cfg.name]
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.warmup_steps = warmup_steps(schedule_cfg, tokens_per_step)
        super().__init__(optimizer)

    def multiplier(self, step: int) -> float:
        return self.fn(step, self.total_steps, self.warmup_steps, self.cfg, self.tokens_per_step)

    def get_lr(self) -> list[float]:
        m = self.multiplier(self.last_epoch)
        return [base * m for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": list(self.base_lrs),
            "_last_lr": list(self._last_lr),
            "name": self.cfg.name,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["_step_count"])
        self.base_lrs = [float(x) for x in state_dict["base_lrs"]]
        self._last_lr = [float(x) for x in state_dict["_last_lr"]]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule_cfg: ScheduleConfig, total_steps: int, tokens_per_step: int
) -> ScheduledLR:
    """The LR scheduler for a run: call `.step()` once after each optimizer step."""
    return ScheduledLR(optimizer, schedule_cfg, total_steps, tokens_per_step)
