"""`tokenmill serve` as a user runs it: one real subprocess (health, a request, the log, SIGTERM), and bad input."""

from __future__ import annotations

import hashlib
import http.client
import json
import queue
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import MODEL_NAME

from tokenmill.cli import main
from train_helpers import spawn_cli

# Runs in the child before `tokenmill serve`: each forward pass sleeps, so a stream is still running when
# SIGTERM arrives (the model and engine are otherwise the real ones).
SLOW_MODEL = """
import time
from tokenmill.model.transformer import Transformer
_next_logits = Transformer.next_logits
def _slow(self, *args, **kwargs):
    time.sleep(0.03)
    return _next_logits(self, *args, **kwargs)
Transformer.next_logits = _slow
"""
DEADLINE_S = 90.0


def lines_of(process) -> queue.Queue:
    """The child's output lines, read on a thread so every wait below can be bounded."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, pattern: str, seen: list[str]) -> re.Match:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def post(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn.getresponse()


@pytest.mark.slow
def test_serve_subprocess_answers_logs_and_stops_gracefully_on_sigterm(base_run):
    process = spawn_cli(["serve", str(base_run), "--port", "0", "--model-name", MODEL_NAME], SLOW_MODEL)
    seen: list[str] = []
    try:
        lines = lines_of(process)
        port = int(wait_for_line(lines, r"listening on http://127\.0\.0\.1:(\d+)", seen).group(1))
        deadline = time.monotonic() + DEADLINE_S
        while True:  # poll /health until the app is up
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "".join(seen)
            time.sleep(0.2)
        answer = json.loads(
            post(port, {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 4, "temperature": 0}).read()
        )
        assert answer["usage"]["completion_tokens"] <= 4 and answer["choices"][0]["text"]
        wait_for_line(lines, r"/v1/completions 200 ok .*prompt=3 .*latency=\d+ms ttft=\d+ms tok/s=", seen)

        stream = post(port, {"model": MODEL_NAME, "prompt": "abc", "max_tokens": 40, "stream": True})
        first = stream.readline()
        assert first.startswith(b"data: {")
        process.send_signal(signal.SIGTERM)  # mid-stream: the stream still ends properly
        rest = stream.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["serve", *args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "http"], "--port must be an integer"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--max-batch", "0"], "max-batch must be at least 1"),
        (["--max-queue", "-1"], "max-queue must be at least 1"),
        (["--max-tokens-limit", "1.5"], "--max-tokens-limit must be an integer"),
        (["--model-name", " "], "model name is empty"),
        (["--api-key", ""], "API key is empty"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, base_run, args, message):
    before = snapshot(base_run)
    code, lines = run_cli(capsys, str(base_run), *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert snapshot(base_run) == before


def test_bad_paths_are_one_line_errors(capsys, tmp_path):
    code, lines = run_cli(capsys, str(tmp_path / "missing"))
    assert code == 2 and len(lines) == 1 and "does not exist" in lines[0]
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    code, lines = run_cli(capsys, str(tmp_path / "empty"), "--port", "0")
    assert code == 2 and len(lines) == 1 and "no valid checkpoint" in lines[0]
    assert list((tmp_path / "empty").rglob("*")) == [tmp_path / "empty" / "checkpoints"]


def test_busy_port_fails_before_loading(capsys, base_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, lines = run_cli(capsys, str(base_run), "--port", str(taken.getsockname()[1]))
    assert code == 2 and len(lines) == 1 and "cannot listen on 127.0.0.1" in lines[0]


def test_all_interfaces_without_a_key_warns(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    code, lines = run_cli(capsys, str(tmp_path / "missing"), "--host", "0.0.0.0")
    assert code == 2 and lines[0].startswith("warning: serving on 0.0.0.0 without an API key")
    assert lines[1].startswith("error: ")
    monkeypatch.setenv("TOKENMILL_API_KEY", "k")
    code, lines = run_cli(capsys, str(tmp_path / "missing"), "--host", "0.0.0.0")
    assert code == 2 and len(lines) == 1  # a key from the environment counts: no warning


def test_missing_serve_extra_is_one_line(capsys, base_run, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    code, lines = run_cli(capsys, str(base_run))
    assert code == 2 and lines == [
        ("error: tokenmill serve needs the serve extra (fastapi missing): pip install 'tokenmill[serve]'")
    ]
