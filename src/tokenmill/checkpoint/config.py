"""The `checkpoint` config section: save cadence and retention."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require_positive


@dataclass
class CheckpointConfig:
    interval_steps: int = opt(0, "save every N steps (scaled by train.step_cadence); 0 = only at the end")
    interval_tokens: int = opt(
        0, "save every N training tokens (scaled by train.step_cadence); when > 0 it replaces interval_steps"
    )
    keep_last: int = opt(3, "keep the newest K periodic checkpoints")
    keep_best: int = opt(1, "keep the K best checkpoints by eval loss")
    async_save: bool = opt(False, "distributed runs: overlap the save with training")

    def validate(self) -> None:
        require_positive(self, "checkpoint", "interval_steps", "interval_tokens", "keep_best", allow_zero=True)
        require_positive(self, "checkpoint", "keep_last")
