"""The training loop's own state: its counters (`TrainState`, a checkpoint part). Signals and stop requests are
job control's (tokenmill/jobs)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint (Stateful: the Checkpointer saves and restores it in place)."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float = math.inf
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters of the checkpoint; a counter it predates keeps its fresh-run value."""
        for item in fields(self):
            if item.name in state:
                setattr(self, item.name, type(getattr(self, item.name))(state[item.name]))
