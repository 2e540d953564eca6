"""Request validation and response shapes, without a server; and chat templates rendered and tokenized."""

from __future__ import annotations

import json

import pytest
from serve_helpers import CHAT_TEMPLATE, char_tokenizer

from tokenmill.data.tokenizer import Tokenizer
from tokenmill.errors import UserError
from tokenmill.serve import schema
from tokenmill.serve.chat import encode_chat_prompt, end_of_turn_stops, find_chat_template
from tokenmill.serve.schema import APIError, ChatRequest, CompletionRequest, Limits, parse_request


def parse(body: dict, cls=CompletionRequest):
    return parse_request(json.dumps(body).encode(), cls)


def error_of(body, cls=CompletionRequest) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), cls)
    return caught.value


def test_defaults_follow_openai():
    request = parse({"prompt": "hi"})
    assert (request.max_tokens, request.temperature, request.top_p, request.n, request.stream) == (
        16,
        1.0,
        1.0,
        1,
        False,
    )
    assert request.prompts() == ["hi"] and request.stop_list() == () and not request.include_usage()


@pytest.mark.parametrize(
    "prompt, expected", [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1], [2, 3]], [[1], [2, 3]])]
)
def test_prompt_shapes(prompt, expected):
    assert parse({"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"prompt": "a", "n": True}, "n", "valid integer"),
        ({"prompt": "a", "echo": 1}, "echo", "valid boolean"),
        ({"prompt": "a", "extra": 1}, "extra", "Unrecognized request argument supplied: extra"),
        ({"max_tokens": 1}, "prompt", "Missing required parameter"),
        ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop", "at most 4 stop sequences"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"prompt": "a", "best_of": 3}, "best_of", "best_of must equal n"),
        ({"prompt": [], "max_tokens": 1}, "prompt", "prompt must be"),
    ],
)
def test_errors_name_the_parameter(body, param, words):
    err = error_of(body)
    assert err.status == 400 and err.param == param and words in err.message
    assert err.body() == {
        "error": {"message": err.message, "type": "invalid_request_error", "param": param, "code": None}
    }


def test_body_errors():
    assert "not valid JSON" in error_of(b"{").message
    assert "not valid JSON" in error_of(b'{"prompt": "a", "top_p": Infinity}').message
    assert "must be a JSON object" in error_of(b"[1]").message
    assert "not valid JSON" in error_of(b"\xff\xfe").message


def test_chat_request():
    request = parse(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 5,
        },
        ChatRequest,
    )
    assert request.messages[0].text() == "ab" and request.token_budget() == 5
    assert error_of({"messages": []}, ChatRequest).param == "messages"
    assert error_of({"messages": [{"role": "user", "content": "a"}], "tools": []}, ChatRequest).param == "tools"
    assert (
        "needs logprobs"
        in error_of({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, ChatRequest).message
    )


def test_limits():
    limits = Limits(context_tokens=10, max_tokens=8, max_n=2, max_prompts=2)
    schema.check_limits(limits, [2, 2], 8, 2)
    for lengths, max_tokens, n, param in [
        ([2], 9, 1, "max_tokens"),
        ([2], 1, 3, "n"),
        ([1, 1, 1], 1, 1, "prompt"),
        ([3], 8, 1, "prompt"),
    ]:
        with pytest.raises(APIError) as caught:
            schema.check_limits(limits, lengths, max_tokens, n)
        assert caught.value.param == param
    with pytest.raises(APIError) as caught:
        schema.check_limits(limits, [3], 8, 1)
    assert caught.value.code == "context_length_exceeded" and "context is 10 tokens" in caught.value.message


def test_stream_chunks_and_framing():
    env = schema.Envelope.new("chatcmpl", "m")
    assert env.id.startswith("chatcmpl-") and len(env.id) > 20
    chunk = schema.chat_chunk(env, 0, {"content": "x"}, None, with_usage=True)
    assert chunk["choices"][0]["finish_reason"] is None and chunk["usage"] is None
    assert "usage" not in schema.chat_chunk(env, 0, {}, "stop", with_usage=False)
    event = schema.sse(schema.usage_chunk(env, "chat.completion.chunk", schema.usage(3, 4)))
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n") and event.count(b"\n") == 2
    assert json.loads(event[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert schema.DONE == b"data: [DONE]\n\n"


def test_chat_template_from_tokenizer_config(tmp_path):
    tokenizer = char_tokenizer()
    assert find_chat_template(tmp_path, tokenizer) is None  # a base model
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    template = find_chat_template(tmp_path, tokenizer)
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<|bos|>user: hi<|eos|><|bos|>assistant: "
    ids = encode_chat_prompt(tokenizer, text)
    assert (
        ids[0] == tokenizer.bos_id and tokenizer.eos_id in ids and len(ids) == 3 + len("user: hi") + len("assistant: ")
    )
    assert tokenizer.encode("<|eos|>") != [tokenizer.eos_id]  # plain encoding would spell the marker out
    assert end_of_turn_stops(template, tokenizer) == ()


def test_chat_template_file_named_templates_and_end_of_turn(tmp_path):
    tokenizer = Tokenizer.byte()
    config = {
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}],
        "eos_token": {"content": "<|end|>"},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = find_chat_template(tmp_path, tokenizer)
    assert template.render([]) == "1" and end_of_turn_stops(template, tokenizer) == ("<|end|>",)
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('only user turns') }}")
    with pytest.raises(UserError, match="only user turns"):
        find_chat_template(tmp_path, tokenizer).render([{"role": "system", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(UserError, match="not valid Jinja"):
        find_chat_template(tmp_path, tokenizer)


def test_chat_template_is_sandboxed(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(UserError, match="refused"):
        find_chat_template(tmp_path, Tokenizer.byte()).render([])
