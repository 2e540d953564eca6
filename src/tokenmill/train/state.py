"""The training loop's own state: its counters (`TrainState`, a checkpoint part) and the stop request that
SIGINT / SIGTERM raise (`StopRequest`)."""

from __future__ import annotations

from collections.abc import Iterator

import contextlib
import math
import signal
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


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the current step and exits 0.

    A second Ctrl-C stops at once (KeyboardInterrupt), except inside `protect()` - a checkpoint save - where
    it is held until the save has completed: an interrupted save would cost the checkpoint it was writing.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._protecting = False
        self._held = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker): no handlers
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            if self._protecting:
                self._held = True
                return
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.reason = signal.Signals(signum).name

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """Hold a second Ctrl-C until the block (a checkpoint save) has finished, then stop."""
        self._protecting = True
        try:
            yield
        finally:
            self._protecting = False
        if self._held:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
