"""The wire below the SDK: exact SSE bytes, auth, the bad-request battery, in-band errors, health and metrics."""

from __future__ import annotations

import http.client
import json

import pytest
from serve_helpers import CONTEXT, MODEL_NAME, live_server, openai


def request(
    server, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, raw body) of one HTTP request over a fresh loopback connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def assert_openai_error(status: int, raw: bytes, expected_status: int) -> dict:
    assert status == expected_status, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_sse_framing_bytes(base_server):
    status, headers, raw = request(
        base_server,
        "POST",
        "/v1/completions",
        {
            "model": MODEL_NAME,
            "prompt": "abc",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n") and b"\r" not in raw
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event  # one data line per event
        chunks.append(json.loads(event[len(b"data: ") :]))
    *content, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert content[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["usage"] is None for c in content)
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 3


def test_health_and_metrics(base_server):
    status, _, raw = request(base_server, "GET", "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    request(base_server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    status, headers, raw = request(base_server, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'tokenmill_requests_total{endpoint="/v1/completions",outcome="ok",status="200"}' in text
    for name in (
        "tokenmill_time_to_first_token_seconds_bucket",
        "tokenmill_request_latency_seconds_bucket",
        "tokenmill_queue_depth",
        "tokenmill_completion_tokens_total",
    ):
        assert name in text


BAD_COMPLETIONS = {
    "invalid JSON": (b'{"prompt": "a", ', 400),
    "not an object": (b'["a"]', 400),
    "NaN is not JSON": (b'{"prompt": "a", "temperature": NaN}', 400),
    "missing prompt": ({"max_tokens": 2}, 400),
    "prompt of wrong type": ({"prompt": 5}, 400),
    "prompt list of mixed types": ({"prompt": ["a", 1]}, 400),
    "max_tokens as a string": ({"prompt": "a", "max_tokens": "5"}, 400),
    "max_tokens zero": ({"prompt": "a", "max_tokens": 0}, 400),
    "max_tokens above the limit": ({"prompt": "a", "max_tokens": 65}, 400),
    "temperature above 2": ({"prompt": "a", "temperature": 3}, 400),
    "top_p zero": ({"prompt": "a", "top_p": 0}, 400),
    "n zero": ({"prompt": "a", "n": 0}, 400),
    "n above the limit": ({"prompt": "a", "n": 99}, 400),
    "five stop strings": ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400),
    "empty stop string": ({"prompt": "a", "stop": ""}, 400),
    "unknown field": ({"prompt": "a", "frobnicate": True}, 400),
    "prompt longer than the context": ({"prompt": "x" * CONTEXT, "max_tokens": 1}, 400),
    "token id outside the vocabulary": ({"prompt": [1, 2, 100000]}, 400),
    "stream_options without stream": ({"prompt": "a", "stream_options": {"include_usage": True}}, 400),
    "logit_bias": ({"prompt": "a", "logit_bias": {"1": 5}}, 400),
    "unknown model": ({"prompt": "a", "model": "gpt-9"}, 404),
    "body over the size limit": ({"prompt": "a" * (2 << 20)}, 413),
}


@pytest.mark.parametrize("body, status", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_completion_requests(base_server, body, status):
    code, _, raw = request(base_server, "POST", "/v1/completions", body)
    assert_openai_error(code, raw, status)
    assert request(base_server, "GET", "/health")[0] == 200


def test_bad_requests_outside_the_schema_and_server_still_answers(base_server, chat_server):
    assert_openai_error(*request(base_server, "GET", "/v1/nowhere")[::2], 404)
    assert_openai_error(*request(base_server, "GET", "/v1/completions")[::2], 405)
    assert_openai_error(*request(chat_server, "POST", "/v1/chat/completions", {"messages": []})[::2], 400)
    bad_role = {"messages": [{"role": "wizard", "content": "hi"}]}
    assert_openai_error(*request(chat_server, "POST", "/v1/chat/completions", bad_role)[::2], 400)
    tools = {"messages": [{"role": "user", "content": "hi"}], "tools": []}
    assert_openai_error(*request(chat_server, "POST", "/v1/chat/completions", tools)[::2], 400)
    answer = base_server.client().completions.create(model=MODEL_NAME, prompt="ok", max_tokens=3)
    assert answer.choices[0].text


def test_api_key(base_run):
    with live_server(base_run, api_key="s3cret") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = assert_openai_error(*request(server, "GET", "/v1/models", headers=headers)[::2], 401)
            assert error["code"] == "invalid_api_key"
        assert request(server, "GET", "/metrics")[0] == 401
        assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(server, "GET", "/health")[0] == 200  # open, for load balancers
        assert request(server, "GET", "/")[0] == 200  # the page holds no data; its requests send the key
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert server.client(api_key="s3cret").completions.create(model=MODEL_NAME, prompt="a", max_tokens=2)


def test_failure_after_the_stream_started_is_sent_in_band(base_run):
    calls = []

    def inject(served):  # test-only fault: the real engine's third forward pass raises
        model = served.generator.model
        real = model.next_logits
        eos = served.generator.tokenizer.eos_id

        def fail_on_third_step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            logits = real(*args, **kwargs)
            logits[..., eos] = float("-inf")  # a sampled EOS would end the stream before the third step
            return logits

        model.next_logits = fail_on_third_step

    with live_server(base_run, prepare=inject) as server:
        client = server.client()
        received = []
        with pytest.raises(openai.APIError, match="injected failure"):
            for chunk in server.client(strict=False).completions.create(
                model=MODEL_NAME, prompt="abc", max_tokens=20, stream=True
            ):
                received.append(chunk)  # a loop, not list(): the error cuts it short
        assert received  # the failure came after streaming started
        assert client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=3).choices[0].text
