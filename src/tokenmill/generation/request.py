"""A submitted prompt as its consumer sees it: the deltas of its samples, in order, then the end.

The engine (generation/engine.py) puts each delta on the request's queue as it is generated and the end marker
after the last one; a consumer iterates the queue. With a worker thread (`Generator.start()`) the consumer just
waits; without one it drives the engine's steps itself. The end marker is the only end: a consumer that wakes
up after the request finished still reads every delta before it.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tokenmill.generation.healing import Healing
from tokenmill.generation.params import Completion, SamplingParams, StreamDelta

if TYPE_CHECKING:
    from tokenmill.generation.engine import Generator

_DONE = object()  # end of a request's delta queue
WORKER_POLL_SECONDS = 0.1  # a consumer waiting on a worker re-checks this often whether the worker still runs


class Request:
    """One submitted prompt and its n samples. Iterate it for `StreamDelta`s, or call `completions()`."""

    def __init__(
        self,
        engine: Generator,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt_index: int,
        healing: Healing | None = None,
    ) -> None:
        """`healing`: the prompt is prefilled without its last token and the first token is restricted."""
        self.engine = engine
        self.healing = healing
        self.prompt_ids = healing.prompt_ids if healing is not None else prompt_ids  # what is prefilled
        self.params = params
        self.prompt_index = prompt_index
        self.admitted = 0  # samples that got a row
        self.cancelled = False
        self._dropped = 0  # samples ended without a completion (cancelled)
        self._completions: dict[int, Completion] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._drained = False  # the end marker was taken from the queue

    @property
    def done(self) -> bool:
        """Every sample has finished or was cancelled."""
        return len(self._completions) + self._dropped == self.params.n

    def cancel(self) -> None:
        """Stop this request's samples at the next step boundary (a server calls this when a client leaves)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            item = self._next()
            if item is _DONE:
                return
            yield item

    def completions(self) -> list[Completion]:
        """Wait for every sample; their completions in sample order (cancelled samples are missing)."""
        for _ in self:
            pass
        return [self._completions[i] for i in sorted(self._completions)]

    def _next(self) -> Any:
        """The next queued item, waiting for the worker or, without one, driving the engine until there is one."""
        # not `done`: it turns true before the consumer has read the last deltas (see the module docstring)
        if self._drained:  # an earlier iteration took the end marker
            return _DONE
        while True:
            worker = self.engine.has_worker
            try:
                item = self._queue.get(timeout=WORKER_POLL_SECONDS) if worker else self._queue.get_nowait()
            except queue.Empty:
                if not worker and not self.engine.step() and self._queue.empty():
                    raise RuntimeError("the generator went idle before this request finished") from None
                continue
            if isinstance(item, BaseException):
                raise item
            self._drained = item is _DONE
            return item

    # -- called by the engine (under its step lock) ------------------------------------------------------
    def deliver(self, delta: StreamDelta) -> None:
        self._queue.put(delta)

    def complete(self, completion: Completion) -> None:
        self._completions[completion.sample_index] = completion
        self._maybe_done()

    def drop(self, samples: int) -> None:
        self._dropped += samples
        self._maybe_done()

    def fail(self, err: BaseException) -> None:
        self._queue.put(err)

    def _maybe_done(self) -> None:
        if self.done:
            self._queue.put(_DONE)
