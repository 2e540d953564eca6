"""A request on its way through the scheduler: what it asks for, and the channel its pieces come back on.

The scheduler's worker thread produces; the event loop consumes. `emit` hands each piece to the loop with
`call_soon_threadsafe`, so the loop never blocks on the worker and the worker never waits for a slow client.
`cancel` may be called from either side; the worker drops a cancelled job at its next step boundary.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.serve.schema import APIError

_END = object()


@dataclass(frozen=True)
class Piece:
    """New text of one choice (choice = prompt index * n + sample index); finish_reason on its last piece."""

    choice: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None


class Job:
    """One HTTP request's generation: its prompts and params in, its pieces out."""

    def __init__(self, prompts: list[list[int]], params: Any, arrived_at: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.prompts = prompts
        self.params = params  # tokenmill.generation.engine.SamplingParams
        self.arrived_at = arrived_at  # time.perf_counter() when the request arrived
        self.started_at: float | None = None  # when the worker admitted it into a batch
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()

    def sequences(self) -> int:
        """Batch rows this job occupies while it runs."""
        return len(self.prompts) * self.params.n

    # -- worker side ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = time.perf_counter()

    def emit(self, piece: Piece) -> None:
        self._put(piece)

    def finish(self) -> None:
        self._done.set()
        self._put(_END)

    def fail(self, message: str) -> None:
        self._done.set()
        self._put(APIError(500, message, kind="server_error"))

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    # -- either side ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def finished(self) -> bool:
        return self._done.is_set()

    def queue_wait_s(self) -> float:
        return (self.started_at or time.perf_counter()) - self.arrived_at

    # -- event-loop side ---------------------------------------------------------------------------------
    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces in generation order until the job ends; raises the APIError of a failed job."""
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, APIError):
                raise item
            yield item
