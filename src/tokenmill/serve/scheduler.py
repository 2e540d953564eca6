"""The request queue and the one worker thread that owns the model.

Requests wait in a bounded queue (full: 429 with Retry-After). The worker admits waiting requests into the
engine's running batch whenever rows are free, so new prompts join at step boundaries instead of waiting for
the whole batch to finish (continuous batching, as in Orca, Yu et al. 2022, OSDI). Each step's new text is
routed to its request; a request whose client went away is removed from the batch at the next step, which
frees its rows for the next waiting request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any

from tokenmill.serve.jobs import Job, Piece
from tokenmill.serve.schema import APIError

LOG = logging.getLogger("tokenmill.serve")
IDLE_WAIT_S = 0.5  # how long the idle worker sleeps between checks for shutdown


class Scheduler:
    """Admits jobs into the engine's batch, steps it, and hands each job its pieces."""

    def __init__(self, generator: Any, max_batch: int, max_queue: int) -> None:
        self.generator = generator  # tokenmill.generation.engine.Generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}  # engine request handle -> job
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- event-loop side ---------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: Any, arrived_at: float, retry_after_s: int) -> Job:
        """Queue a job, or refuse with 429 when the queue is full (503 while shutting down)."""
        if len(prompts) * params.n > self.max_batch:
            raise APIError(400, f"this request needs {len(prompts) * params.n} sequences (prompts x n) but a batch "
                           f"holds {self.max_batch} (--max-batch): send fewer prompts or a smaller n", "n")
        job = Job(prompts, params, arrived_at, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down", kind="server_error")
            if len(self._waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self._waiting)} requests are already waiting; retry "
                               f"in {retry_after_s} s", kind="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(retry_after_s)})
            self._waiting.append(job)
            self._wake.notify()
        return job

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tokenmill-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Refuse new jobs, cancel the waiting ones, and give running ones `timeout_s` to finish."""
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.fail("the server shut down before this request started")
            self._waiting.clear()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                for job in list(self._running.values()):
                    job.cancel()
                self._thread.join(timeout_s)

    # -- worker thread -----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._running and not self._stopping:
                    self._wake.wait(IDLE_WAIT_S)
                if self._stopping and not self._running:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
            except Exception as err:  # a bug or an engine failure must not kill the server: fail the batch
                LOG.exception("generation failed")
                self._fail_running(f"generation failed: {type(err).__name__}: {err}")

    def _admit(self) -> None:
        """Move waiting jobs into the batch while their rows fit."""
        while True:
            with self._lock:
                if not self._waiting or self._stopping:
                    return
                job = self._waiting[0]
                if job.cancelled():
                    self._waiting.popleft()
                    continue
                if self._rows_used() + job.sequences() > self.max_batch:
                    return
                self._waiting.popleft()
            job.start()
            handle = self.generator.add_request(job.prompts, job.params)
            self._running[handle] = job

    def _step(self) -> None:
        """One engine step; each new piece goes to its job, and finished jobs leave the batch."""
        for handle, delta in self.generator.step():
            job = self._running.get(handle)
            if job is None:
                continue
            job.emit(Piece(delta.choice, delta.text, tuple(delta.token_ids), delta.finish_reason))
        for handle in self.generator.finished_requests():
            job = self._running.pop(handle, None)
            if job is not None:
                job.finish()

    def _drop_cancelled(self) -> None:
        for handle, job in list(self._running.items()):
            if job.cancelled():
                self.generator.cancel_request(handle)
                del self._running[handle]
                job.finish()

    def _fail_running(self, message: str) -> None:
        for handle, job in list(self._running.items()):
            self.generator.cancel_request(handle)
            job.fail(message)
        self._running.clear()

    def _rows_used(self) -> int:
        return sum(job.sequences() for job in self._running.values())
