"""Training stability guards: the loss divergence detector (the non-finite step policy is applied by the loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class DivergenceDetector:
    """Fast and slow exponential moving averages of the loss; a fast EMA far above the slow one means divergence.

    A dual-time-scale rule: a loss spike moves the fast EMA long before the slow one, so the gap
    `fast - slow` measures a sustained rise rather than one noisy step.
    """

    threshold: float
    fast_alpha: float
    slow_alpha: float
    warmup_steps: int
    fast: float = math.nan
    slow: float = math.nan
    seen: int = 0

    def update(self, loss: float) -> bool:
        """Feed one finite step loss; True when the run has diverged."""
        if not math.isfinite(loss):
            return False
        if self.seen == 0:
            self.fast = self.slow = loss
        else:
            self.fast += self.fast_alpha * (loss - self.fast)
            self.slow += self.slow_alpha * (loss - self.slow)
        self.seen += 1
        return self.threshold > 0 and self.seen > self.warmup_steps and self.fast - self.slow > self.threshold

    def state_dict(self) -> dict[str, float]:
        return {"fast": self.fast, "slow": self.slow, "seen": self.seen}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.fast, self.slow, self.seen = float(state["fast"]), float(state["slow"]), int(state["seen"])

    def describe(self) -> str:
        return f"fast loss EMA {self.fast:.4f} exceeds slow EMA {self.slow:.4f} by more than {self.threshold}"
