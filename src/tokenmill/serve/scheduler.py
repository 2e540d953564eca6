"""The server's request queue in front of the generation engine, which owns the model and the batching.

The engine (`tokenmill.generation.engine.Generator`) runs its steps on one worker thread and admits submitted
prompts into free batch rows at every step boundary, so new requests join a running batch instead of waiting
for it to finish (continuous batching, Orca: Yu et al. 2022, OSDI). What is left for the server: bound the
number of requests waiting for a row (one more is answered 429 with Retry-After), refuse work while shutting
down, and give in-flight requests a deadline when the server stops.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from tokenmill.errors import UserError
from tokenmill.serve.jobs import Job
from tokenmill.serve.schema import APIError

DRAIN_POLL_S = 0.05


class Scheduler:
    """Admission control over one engine: queue bound, job bookkeeping, start and graceful stop."""

    def __init__(self, generator: Any, max_batch: int, max_queue: int) -> None:
        self.generator = generator  # tokenmill.generation.engine.Generator, built with max_batch_size=max_batch
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._jobs: set[Job] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def submit(self, prompts: list[list[int]], params: Any, arrived_at: float, retry_after_s: int) -> Job:
        """Hand a request's prompts to the engine, or refuse: 429 when the queue is full, 503 while stopping."""
        with self._lock:
            self._forget_finished()
            if self._stopping:
                raise APIError(503, "the server is shutting down", kind="server_error")
            waiting = self._waiting()
            if waiting >= self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy: {waiting} requests are already waiting; retry in {retry_after_s} s",
                    kind="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(retry_after_s)},
                )
            try:
                requests = [self.generator.submit(ids, params, prompt_index=i) for i, ids in enumerate(prompts)]
            except UserError as err:  # the engine's own prompt checks (vocabulary, context)
                raise APIError(400, str(err), "prompt") from None
            job = Job(requests, params.n, arrived_at, asyncio.get_running_loop())
            self._jobs.add(job)
        return job

    def queue_depth(self) -> int:
        """Requests waiting for batch rows."""
        with self._lock:
            self._forget_finished()
            return self._waiting()

    def running(self) -> int:
        """Requests generating (all their samples have rows)."""
        with self._lock:
            self._forget_finished()
            return len(self._jobs) - self._waiting()

    def start(self) -> None:
        self.generator.start()

    def stop(self, timeout_s: float) -> None:
        """Refuse new requests, fail the waiting ones, give running ones `timeout_s`, then stop the engine."""
        with self._lock:
            self._stopping = True
            for job in self._jobs:
                if not job.admitted():
                    job.fail("the server shut down before this request started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(not job.finished() for job in list(self._jobs)):
            time.sleep(DRAIN_POLL_S)
        for job in list(self._jobs):
            job.cancel()
        self.generator.close()

    def _waiting(self) -> int:
        return sum(not job.admitted() for job in self._jobs)

    def _forget_finished(self) -> None:
        self._jobs = {job for job in self._jobs if not job.finished()}
