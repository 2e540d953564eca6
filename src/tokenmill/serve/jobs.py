"""A request on its way through the server: the engine requests it made, and the channel its pieces come back on.

One HTTP request becomes one engine `Request` per prompt (each with its n samples). A forwarding thread per
engine request reads its deltas (the engine's iterator blocks) and hands each to the event loop with
`call_soon_threadsafe`, so the loop never blocks on generation and the engine never waits for a slow client.
`cancel` stops every engine request at the next step boundary, which frees their batch rows.
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
    """New output of one choice (choice = prompt index * n + sample index); finish_reason on its last piece."""

    choice: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[float, ...] | None = None


class Job:
    """One HTTP request's generation: engine requests in, pieces out to the event loop."""

    def __init__(self, requests: list[Any], n: int, arrived_at: float, loop: asyncio.AbstractEventLoop) -> None:
        self.requests = requests  # tokenmill.generation.engine.Request, one per prompt
        self.n = n
        self.arrived_at = arrived_at  # time.perf_counter() when the HTTP request arrived
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._open = len(requests)  # forwarding threads still running
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._admitted_at: float | None = None
        self._started = 0  # engine requests that delivered their first delta (prefill done)
        for request in requests:
            threading.Thread(target=self._forward, args=(request,), name="tokenmill-serve-forward", daemon=True).start()

    def admitted(self) -> bool:
        """True once every sample of every prompt has a batch row (the job left the queue)."""
        if self._admitted_at is None and all(r.admitted == r.params.n for r in self.requests):
            self._admitted_at = time.perf_counter()
        return self._admitted_at is not None

    def queue_wait_s(self) -> float:
        """Arrival until every prompt was admitted (at the latest, until its first token: prefill included)."""
        return (self._admitted_at or time.perf_counter()) - self.arrived_at

    def prompt_tokens(self) -> int:
        """Prompt tokens the model reads: a healed prompt's last token is generated again, so it counts once, as
        a completion token (generation/healing.py)."""
        return sum(len(r.prompt_ids) for r in self.requests)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    def finished(self) -> bool:
        return self._done.is_set()

    def fail(self, message: str) -> None:
        """End the job with an error its consumer raises (used when the server stops before it ran)."""
        self.cancel()
        self._put(APIError(503, message, kind="server_error"))

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces in generation order until every prompt's samples ended; raises the APIError of a failure."""
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, APIError):
                raise item
            yield item

    # -- forwarding threads ------------------------------------------------------------------------------
    def _forward(self, request: Any) -> None:
        base = request.prompt_index * self.n
        first = True
        try:
            for delta in request:
                if first:
                    self._note_started()
                    first = False
                logprobs = tuple(delta.logprobs) if delta.logprobs is not None else None
                self._put(
                    Piece(base + delta.sample_index, delta.text, tuple(delta.token_ids), delta.finish_reason, logprobs)
                )
        except Exception as err:  # the engine re-raises whatever failed its step, in every request
            self.cancel()
            self._put(APIError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error"))
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self._done.set()
            self._put(_END)

    def _note_started(self) -> None:
        """A prompt's first delta means its samples were admitted; the last prompt's ends the queue wait."""
        with self._lock:
            self._started += 1
            if self._started == len(self.requests) and self._admitted_at is None:
                self._admitted_at = time.perf_counter()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()
