"""The effective training recipe in numbers: each parameter role's learning rate, the warmup length, and a
one-line description of the optimizer groups and the schedule for the start-up banner. Imports no torch.
"""

from __future__ import annotations

import math
from typing import Any

from tokenmill.errors import UserError

ROLE_LABELS = {"matrix": "matrices", "head": "head", "embedding": "embeddings", "norm": "norms", "bias": "biases"}


def role_lrs(cfg: Any, lr: float, width: int) -> dict[str, float]:
    """AdamW learning rate of each parameter role (param_groups.ROLES) from `optim.lr` and the per-role keys.

    Embeddings, norms and biases take `embedding_lr` / `scalar_lr` as given. Hidden matrices and the head take
    `lr` / `head_lr` times `lr_reference_width / width` when `lr_reference_width` is set: under Adam a matrix's
    update grows with its fan-in, so its LR must shrink as 1/width to keep the same effect, while an embedding
    row's update does not (muP, Yang et al. 2022, arXiv:2203.03466, Table 3). Muon's matrices need no such
    factor (their update is orthogonalised and scaled by shape).
    """
    width_scale = cfg.lr_reference_width / width if cfg.lr_reference_width and width else 1.0
    return {
        "matrix": lr * width_scale,
        "head": (cfg.head_lr or lr) * width_scale,
        "embedding": cfg.embedding_lr or lr,
        "norm": cfg.scalar_lr or lr,
        "bias": cfg.scalar_lr or lr,
    }


def warmup_steps(cfg: Any, tokens_per_step: int) -> int:
    """Warmup length in optimizer steps: `warmup_tokens` rounded up to whole steps when set, else `warmup_steps`.

    Counting warmup in tokens keeps its length in data fixed when the batch size changes."""
    if cfg.warmup_tokens <= 0:
        return cfg.warmup_steps
    if tokens_per_step <= 0:
        raise UserError(f"schedule.warmup_tokens needs tokens_per_step > 0, got {tokens_per_step}")
    return math.ceil(cfg.warmup_tokens / tokens_per_step)


def describe_groups(optim_cfg: Any, width: int, tied: bool, lr_scale: float = 1.0) -> str:
    """'Muon 0.02: matrices | AdamW 0.003: embeddings, norms' - which optimizer and LR each role gets."""
    lrs = role_lrs(optim_cfg, optim_cfg.lr, width)
    roles = [r for r in ROLE_LABELS if not (tied and r == "head")]  # a tied head is the embedding
    groups: dict[tuple[str, float], list[str]] = {}
    for role in roles:
        if optim_cfg.name == "muon" and role == "matrix":
            key = ("Muon", optim_cfg.muon_lr * lr_scale)
        else:
            key = ({"adamw": "AdamW", "muon": "AdamW"}.get(optim_cfg.name, optim_cfg.name), lrs[role] * lr_scale)
        groups.setdefault(key, []).append(ROLE_LABELS[role])
    return " | ".join(f"{name} {lr:.3g}: {', '.join(labels)}" for (name, lr), labels in groups.items())


def describe_schedule(schedule_cfg: Any, total_steps: int, tokens_per_step: int) -> str:
    """'wsd-linear: warmup 100 steps, peak to step 800, then to 0.1x at 1000' - the LR's shape in steps."""
    warm = warmup_steps(schedule_cfg, tokens_per_step)
    name, low = schedule_cfg.name, schedule_cfg.min_lr_ratio
    if name in ("wsd", "wsd-linear"):
        start = max(warm, total_steps - round(schedule_cfg.decay_ratio * total_steps))
        decay = "linearly" if name == "wsd-linear" else "as 1 - sqrt"
        return f"{name}: warmup {warm} steps, peak to step {start}, then {decay} to {low:g}x at {total_steps}"
    if name in ("cosine", "linear"):
        return f"{name}: warmup {warm} steps, then to {low:g}x at {total_steps}"
    return f"{name}: warmup {warm} steps, {total_steps} steps"
