"""Signals as job-control codes, so a signal and a `tokenmill control` request take the same path.

SIGTERM (a scheduler's notice) and a first Ctrl-C ask to stop (checkpoint, exit 0); a second Ctrl-C asks to abort
(exit without a checkpoint); SIGUSR1 asks for a checkpoint now. The loop acts on them at the next step boundary on
every rank together. A third Ctrl-C raises KeyboardInterrupt at once, for a step that never ends, except inside
`protect()` - a checkpoint save - where it waits for the save to complete: an interrupted save would cost the
checkpoint it was writing.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from tokenmill.jobs.actions import Action

INTERRUPTS_BEFORE_RAISE = 2  # Ctrl-C number 1 stops, number 2 aborts, number 3 raises


class SignalRequests:
    """The action this process's signals ask for; handlers are installed on creation, removed by `restore()`."""

    def __init__(self) -> None:
        self.action = Action.NONE
        self._interrupts = 0
        self._protecting = False
        self._held = False
        self._previous = {}
        wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        for sig in wanted:
            # off the main thread (a notebook worker) handlers cannot be installed: the run has none
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > INTERRUPTS_BEFORE_RAISE:
                if self._protecting:
                    self._held = True
                    return
                raise KeyboardInterrupt
            wanted = Action.STOP if self._interrupts == 1 else Action.ABORT
        else:
            wanted = Action.STOP if signum == signal.SIGTERM else Action.SAVE
        self.action = max(self.action, wanted)

    def clear(self, done: Action) -> None:
        """Forget a pending action that `done` (carried out) answers; a higher one stays pending."""
        if self.action <= done:
            self.action = Action.NONE

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """Hold an interrupting Ctrl-C until the block (a checkpoint save) has finished, then raise it."""
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
