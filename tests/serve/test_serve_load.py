"""Concurrency on loopback: many clients at once, a client that leaves mid-stream, and a full queue (429).

Every loop here is bounded in count and time; the slow-model tests add a fixed delay to each forward pass of
the real engine's model, so that "generation stopped" and "the queue is full" are observable on a fast CPU.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from serve_helpers import MODEL_NAME, live_server

CLIENTS, REQUESTS_EACH = 32, 4
PROMPTS = ["def ", "import os", "class A:", "for i in", "x = 1", "while True", "return", "# note"]
DEADLINE_S = 180.0


def slow_model(calls: list[float], delay_s: float):
    """A `prepare` hook: every forward pass records its time and sleeps `delay_s` first."""

    def prepare(served) -> None:
        model = served.generator.model
        real = model.next_logits

        def slowed(*args, **kwargs):
            calls.append(time.monotonic())
            time.sleep(delay_s)
            return real(*args, **kwargs)

        model.next_logits = slowed

    return prepare


def health(server) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def open_stream(server, body: dict) -> socket.socket:
    """A raw streaming request whose response headers have arrived; the caller reads or drops the socket."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    payload = json.dumps({"model": MODEL_NAME, "stream": True, **body}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    return sock


def test_32_concurrent_clients_all_answered_and_correct(base_server):
    client = base_server.client()
    expected = {
        p: client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0).choices[0].text
        for p in PROMPTS
    }

    def one_client(k: int) -> list[tuple[str, str]]:
        own = base_server.client(timeout=DEADLINE_S)
        streaming = base_server.client(timeout=DEADLINE_S, strict=False)  # see test_serve_openai_client's docstring
        answers = []
        for j in range(REQUESTS_EACH):
            prompt = PROMPTS[(k + j) % len(PROMPTS)]
            if (k + j) % 2:  # half the requests stream
                chunks = streaming.completions.create(
                    model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True
                )
                answers.append((prompt, "".join(c.choices[0].text for c in chunks if c.choices)))
            else:
                answer = own.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
                answers.append((prompt, answer.choices[0].text))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one_client, k) for k in range(CLIENTS)]
        results = [f.result(timeout=DEADLINE_S) for f in futures]
    answers = [a for r in results for a in r]
    assert len(answers) == CLIENTS * REQUESTS_EACH
    wrong = [(prompt, text, expected[prompt]) for prompt, text in answers if text != expected[prompt]]
    assert not wrong, f"batched greedy differs from alone (prompt, batched, alone): {wrong}"
    assert health(base_server)["status"] == "ok"


def test_a_client_that_disconnects_frees_its_slot(base_run):
    calls: list[float] = []
    with live_server(base_run, max_batch=1, prepare=slow_model(calls, 0.02)) as server:
        sock = open_stream(server, {"prompt": "abc", "max_tokens": 80, "temperature": 0})
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: len(calls) >= 3, 10)  # generating
        sock.close()  # the client goes away mid-stream
        assert wait_until(lambda: health(server)["running"] == 0, 10)
        settled = len(calls)
        time.sleep(0.3)
        assert len(calls) == settled < 40  # the engine stopped long before 80 tokens
        # the only batch row is free again: a new request is served at once
        answer = server.client().completions.create(model=MODEL_NAME, prompt="abc", max_tokens=3)
        assert answer.usage.completion_tokens <= 3


def test_a_client_that_leaves_before_a_plain_answer_frees_its_slot(base_run):
    calls: list[float] = []
    with live_server(base_run, max_batch=1, prepare=slow_model(calls, 0.02)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        payload = json.dumps({"model": MODEL_NAME, "prompt": "abc", "max_tokens": 80, "temperature": 0}).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        assert wait_until(lambda: len(calls) >= 3, 10)  # generating, no byte sent back yet
        sock.close()
        assert wait_until(lambda: health(server)["running"] == 0, 10)
        settled = len(calls)
        time.sleep(0.3)
        assert len(calls) == settled < 60


def test_a_full_queue_answers_429_with_retry_after(base_run):
    calls: list[float] = []
    with live_server(base_run, max_batch=1, max_queue=1, prepare=slow_model(calls, 0.05)) as server:
        running = open_stream(server, {"prompt": "abc", "max_tokens": 40, "temperature": 0})  # greedy: no early EOS
        assert wait_until(lambda: health(server)["running"] == 1, 10)
        waiting = open_stream(server, {"prompt": "abc", "max_tokens": 2})
        assert wait_until(lambda: health(server)["queue_depth"] == 1, 10)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"prompt": "abc", "max_tokens": 2}),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 429 and response.getheader("Retry-After") == "1"
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        conn.close()
        running.close()
        waiting.close()
        assert wait_until(lambda: health(server)["running"] == 0 == health(server)["queue_depth"], 10)


def test_requests_from_many_threads_are_batched_together(base_run):
    """While one request runs, others join the batch: 4 requests of 20 tokens take far fewer than 80 steps."""
    calls: list[float] = []
    with live_server(base_run, max_batch=4, prepare=slow_model(calls, 0.01)) as server:

        def one(_):
            return (
                server.client()
                .completions.create(model=MODEL_NAME, prompt="abc", max_tokens=20, temperature=0)
                .usage.completion_tokens
            )

        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(one, range(4), timeout=60))
        assert len(set(done)) == 1 and done[0] >= 5  # same greedy prompt, same answer
        assert len(calls) < 0.75 * sum(done)  # fewer forward passes than tokens: requests shared steps
