"""What the server measures: one log line per request, and the same numbers for Prometheus at GET /metrics.

Per request: latency (arrival to last byte), time to first token, completion tokens per second of generation,
time spent waiting in the queue, and the queue depth it found. Each app has its own registry, so several apps
in one process (tests) do not share counters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LOG = logging.getLogger("tokenmill.serve")

# Seconds; CPU demo models answer in 0.1-10 s, GPUs in 10 ms-1 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class RequestRecord:
    """One finished request, as logged and counted."""

    endpoint: str
    status: int
    request_id: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    first_token_s: float | None = None
    queue_wait_s: float = 0.0
    queue_depth: int = 0  # requests waiting when this one arrived
    outcome: str = "ok"  # ok | error | cancelled | rejected

    def tokens_per_s(self) -> float:
        generating = self.latency_s - (self.first_token_s or 0.0)
        return self.completion_tokens / generating if generating > 0 and self.completion_tokens > 1 else 0.0

    def log_line(self) -> str:
        ttft = f"{self.first_token_s * 1000:.0f}ms" if self.first_token_s is not None else "-"
        return (
            f"{self.endpoint} {self.status} {self.outcome} id={self.request_id} prompt={self.prompt_tokens} "
            f"completion={self.completion_tokens} latency={self.latency_s * 1000:.0f}ms ttft={ttft} "
            f"tok/s={self.tokens_per_s():.1f} queue_wait={self.queue_wait_s * 1000:.0f}ms "
            f"queue_depth={self.queue_depth}"
        )


class ServerMetrics:
    """Prometheus counters and histograms of one app, fed by `record`."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tokenmill_requests",
            "HTTP requests answered, by endpoint, status and outcome",
            ["endpoint", "status", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokenmill_request_latency_seconds",
            "arrival to last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "tokenmill_time_to_first_token_seconds",
            "arrival to the first generated token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "tokenmill_queue_wait_seconds",
            "time a request waited for a batch slot",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("tokenmill_completion_tokens", "tokens generated", registry=self.registry)
        Gauge("tokenmill_queue_depth", "requests waiting for a batch slot", registry=self.registry).set_function(
            queue_depth
        )
        Gauge("tokenmill_running_requests", "requests being generated", registry=self.registry).set_function(running)

    def record(self, record: RequestRecord) -> None:
        self.requests.labels(record.endpoint, str(record.status), record.outcome).inc()
        if record.outcome != "rejected":
            self.latency.labels(record.endpoint).observe(record.latency_s)
            self.queue_wait.observe(record.queue_wait_s)
        if record.first_token_s is not None:
            self.first_token.labels(record.endpoint).observe(record.first_token_s)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        LOG.info(record.log_line())

    def exposition(self) -> bytes:
        """The Prometheus text format (https://prometheus.io/docs/instrumenting/exposition_formats/)."""
        return generate_latest(self.registry)
