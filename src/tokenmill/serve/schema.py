"""Requests of the OpenAI API as tokenmill accepts them, and the error every bad request gets.

The request models are strict on purpose: OpenAI answers 400 to an unknown field or a value of the wrong type
("5" for an integer), so a client that works here works there too. Every failure becomes ONE `APIError` whose
message names the parameter and what is allowed, sent as OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` (https://platform.openai.com/docs/guides/error-codes).
Limits that depend on the served model (context length, token limit, n) are checked in `check_limits`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit for `stop`
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for `logprobs` on /v1/completions


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; also what a stream sends in-band when generation fails after it started."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields both endpoints share. `top_k`, `min_p` and `repetition_penalty` are extensions (as in vLLM)."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_common(self) -> None:
        """Rules between fields, and features accepted by name but not implemented."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0.0:
                raise APIError(400, f"{name} is not supported by this server (use repetition_penalty)", name)


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt` is a string, a list of strings, a token list or a list of token lists."""

    prompt: Any = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    token_healing: bool = False  # extension: the first token may re-split the prompt's last token (SamplingParams)

    def check(self) -> None:
        self.check_common()
        self.prompts()
        if self.token_healing and self.logprobs is not None:
            # a healed first token begins inside the prompt, which text_offset cannot express
            raise APIError(400, "token_healing with logprobs is not supported: drop one of the two", "token_healing")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of must equal n (ranking extra samples is not supported)", "best_of")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
        if self.suffix is not None:
            raise APIError(400, "suffix (insertion) is not supported by this server", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings or token-id lists; raises APIError on any other shape."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(_is_token(t) for t in prompt):
                return [list(prompt)]
            if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
                return [list(p) for p in prompt]
        raise APIError(
            400,
            "prompt must be a string, a non-empty list of strings, a list of token ids or a list "
            "of non-empty token-id lists",
            "prompt",
        )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass(frozen=True)
class Limits:
    """What the served model and the operator allow per request."""

    context_tokens: int  # the model's max_seq_len: prompt + completion must fit
    max_tokens: int  # the largest max_tokens a request may ask for
    max_n: int  # the most choices per prompt
    max_prompts: int  # the most prompts in one /v1/completions request


def check_limits(limits: Limits, prompt_lengths: list[int], max_tokens: int, n: int) -> None:
    """Refuse what cannot be served: too many choices, a token budget above the limit, a prompt that leaves no room."""
    if n > limits.max_n:
        raise APIError(400, f"n={n} is above this server's limit of {limits.max_n}", "n")
    if len(prompt_lengths) > limits.max_prompts:
        raise APIError(
            400,
            f"{len(prompt_lengths)} prompts is above this server's limit of {limits.max_prompts} per request",
            "prompt",
        )
    if max_tokens > limits.max_tokens:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is above this server's limit of {limits.max_tokens} (--max-tokens-limit)",
            "max_tokens",
        )
    for length in prompt_lengths:
        if length == 0:
            raise APIError(400, "the prompt is empty: give at least one token of text", "prompt")
        if length + max_tokens > limits.context_tokens:
            raise APIError(
                400,
                f"this model's context is {limits.context_tokens} tokens, but the prompt has {length} "
                f"tokens and max_tokens is {max_tokens}: shorten the prompt or lower max_tokens",
                "prompt",
                "context_length_exceeded",
            )


def parse_request(body: bytes, model_cls: type[_Request]) -> Any:
    """The validated request in `body`, or an APIError naming the first problem found."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        request = model_cls.model_validate(data)
    except ValidationError as err:
        raise _as_api_error(err) from None
    request.check()
    return request


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _as_api_error(err: ValidationError) -> APIError:
    """One line for the first problem pydantic found, worded like OpenAI's own messages."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'", param)
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {message} (got {_short(first.get('input'))})", param)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, BaseModel) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# responses and stream chunks, field for field as OpenAI sends them

DONE = b"data: [DONE]\n\n"  # the stream's last event: the SDK stops at a data line starting with [DONE]


@dataclass(frozen=True)
class Envelope:
    """The id, creation time and model name that every response and chunk of one request repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Envelope:
        """`prefix` is "cmpl" for /v1/completions and "chatcmpl" for /v1/chat/completions, as OpenAI's ids."""
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line, the framing every OpenAI client parses."""
    return b"data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, content: str, finish_reason: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def completion_response(env: Envelope, choices: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": env.id,
        "object": "text_completion",
        "created": env.created,
        "model": env.model,
        "choices": choices,
        "usage": counts,
    }


def chat_response(env: Envelope, choices: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": env.id,
        "object": "chat.completion",
        "created": env.created,
        "model": env.model,
        "choices": choices,
        "usage": counts,
    }


def completion_chunk(env: Envelope, choice: dict[str, Any], with_usage: bool) -> dict[str, Any]:
    """A streamed piece of one choice; `finish_reason` stays null until that choice's last chunk."""
    chunk = {"id": env.id, "object": "text_completion", "created": env.created, "model": env.model, "choices": [choice]}
    if with_usage:
        chunk["usage"] = None  # OpenAI sends usage: null on every chunk but the usage chunk
    return chunk


def chat_chunk(
    env: Envelope,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    with_usage: bool,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed piece of one chat choice: the first delta carries the role, the last one the finish_reason."""
    chunk = {
        "id": env.id,
        "object": "chat.completion.chunk",
        "created": env.created,
        "model": env.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(env: Envelope, object_kind: str, counts: dict[str, int]) -> dict[str, Any]:
    """The one extra chunk `stream_options.include_usage` asks for: no choices, the whole request's usage."""
    return {
        "id": env.id,
        "object": object_kind,
        "created": env.created,
        "model": env.model,
        "choices": [],
        "usage": counts,
    }
