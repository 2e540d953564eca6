"""From a validated request to generation and back: /v1/completions and /v1/chat/completions share this path.

`plan_*` turns a request into token ids and SamplingParams and checks them against the model's limits;
`collect` builds the whole response, `stream` the server-sent events of a streamed one. Choice `i` of prompt
`p` is choice `p * n + i` of the response, as OpenAI numbers them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.serve import schema
from tokenmill.serve.chat import encode_chat_prompt, end_of_turn_stops
from tokenmill.serve.metrics import RequestRecord
from tokenmill.serve.schema import APIError, Envelope

if TYPE_CHECKING:
    from tokenmill.serve.config import ServeSettings
    from tokenmill.serve.loading import ServedModel
    from tokenmill.serve.scheduler import Job


@dataclass
class Plan:
    """Everything needed to run one request and shape its answer."""

    chat: bool
    env: Envelope
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: Any  # tokenmill.generation.engine.SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    record: RequestRecord = field(default_factory=lambda: RequestRecord("-", 200))

    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return schema.usage(self.prompt_tokens(), completion_tokens)


def plan_completion(request: schema.CompletionRequest, served: ServedModel, settings: ServeSettings) -> Plan:
    check_model_name(request.model, settings)
    if request.logprobs is not None:
        raise APIError(400, "logprobs is not supported by this server yet", "logprobs")
    prompts, texts = [], []
    for prompt in request.prompts():
        ids = served.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if any(i >= served.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be below the vocabulary size {served.vocab_size}", "prompt")
        prompts.append(ids)
        texts.append(prompt if isinstance(prompt, str) else served.tokenizer.decode(ids))
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    limits = served.limits(settings)
    schema.check_limits(limits, [len(p) for p in prompts], max_tokens, request.n)
    params = served.sampling_params(request, max_tokens, request.stop_list())
    return Plan(False, Envelope.new("cmpl", settings.model_name), prompts, texts, params, request.n, request.stream,
                request.include_usage(), echo=request.echo)


def plan_chat(request: schema.ChatRequest, served: ServedModel, settings: ServeSettings) -> Plan:
    check_model_name(request.model, settings)
    if served.chat_template is None:
        raise APIError(400, f"model {settings.model_name!r} is a base model: its checkpoint records no chat template, "
                       f"so it cannot serve /v1/chat/completions; use /v1/completions, or serve a fine-tuned "
                       f"checkpoint with chat_template.jinja or tokenizer_config.json", "messages",
                       "chat_template_missing")
    if request.logprobs:
        raise APIError(400, "logprobs is not supported by this server yet", "logprobs")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in request.messages]
    text = served.chat_template.render(messages)
    ids = encode_chat_prompt(served.tokenizer, text)
    limits = served.limits(settings)
    budget = request.token_budget()
    max_tokens = budget if budget is not None else max(1, min(limits.max_tokens, limits.context_tokens - len(ids)))
    schema.check_limits(limits, [len(ids)], max_tokens, request.n)
    stops = request.stop_list() + end_of_turn_stops(served.chat_template, served.tokenizer)
    params = served.sampling_params(request, max_tokens, stops)
    return Plan(True, Envelope.new("chatcmpl", settings.model_name), [ids], [text], params, request.n,
                request.stream, request.include_usage())


def check_model_name(name: str | None, settings: ServeSettings) -> None:
    if name is not None and name != settings.model_name:
        raise APIError(404, f"The model {name!r} does not exist: this server serves {settings.model_name!r}",
                       "model", "model_not_found")


async def collect(plan: Plan, job: Job) -> dict[str, Any]:
    """The whole (non-streamed) response once every choice has finished."""
    texts: dict[int, list[str]] = {i: [] for i in range(len(plan.prompts) * plan.n)}
    tokens = 0
    finish: dict[int, str] = {}
    async for piece in job.pieces():
        _note_first_token(plan, job)
        texts[piece.choice].append(piece.text)
        tokens += len(piece.token_ids)
        if piece.finish_reason is not None:
            finish[piece.choice] = piece.finish_reason
    plan.record.completion_tokens = tokens
    if plan.chat:
        choices = [schema.chat_choice(i, "".join(t), finish.get(i, "length")) for i, t in texts.items()]
        return schema.chat_response(plan.env, choices, plan.usage(tokens))
    choices = [schema.completion_choice(i, _echo(plan, i) + "".join(t), finish.get(i, "length"))
               for i, t in texts.items()]
    return schema.completion_response(plan.env, choices, plan.usage(tokens))


async def stream(plan: Plan, job: Job) -> AsyncIterator[bytes]:
    """Server-sent events: pieces as they are generated, the usage chunk if asked for, then [DONE].

    A failure after the first byte cannot change the HTTP status any more, so it is sent in-band as an
    OpenAI error object (the SDK raises APIError on it); a client that goes away cancels the job.
    """
    tokens = 0
    choices = range(len(plan.prompts) * plan.n)
    try:
        for i in choices:  # first chunk of each choice: the chat role, or the echoed prompt
            if plan.chat:
                yield schema.sse(schema.chat_chunk(plan.env, i, {"role": "assistant", "content": ""}, None,
                                                   plan.include_usage))
            elif plan.echo:
                yield schema.sse(schema.completion_chunk(
                    plan.env, schema.completion_choice(i, _echo(plan, i), None), plan.include_usage))
        async for piece in job.pieces():
            _note_first_token(plan, job)
            tokens += len(piece.token_ids)
            if not piece.text and piece.finish_reason is None:
                continue
            if plan.chat:
                delta = {"content": piece.text} if piece.text else {}
                chunk = schema.chat_chunk(plan.env, piece.choice, delta, piece.finish_reason, plan.include_usage)
            else:
                chunk = schema.completion_chunk(
                    plan.env, schema.completion_choice(piece.choice, piece.text, piece.finish_reason),
                    plan.include_usage)
            yield schema.sse(chunk)
        if plan.include_usage:
            kind = "chat.completion.chunk" if plan.chat else "text_completion"
            yield schema.sse(schema.usage_chunk(plan.env, kind, plan.usage(tokens)))
        yield schema.DONE
    except APIError as err:  # generation failed after the stream started
        plan.record.outcome = "error"
        yield schema.sse(err.body())
        yield schema.DONE
    finally:
        job.cancel()  # no-op when finished; frees the slot when the client went away
        plan.record.completion_tokens = tokens
        if plan.record.outcome == "ok" and not job.finished():
            plan.record.outcome = "cancelled"


def _echo(plan: Plan, choice: int) -> str:
    return plan.prompt_texts[choice // plan.n] if plan.echo else ""


def _note_first_token(plan: Plan, job: Job) -> None:
    if plan.record.first_token_s is None:
        plan.record.first_token_s = time.perf_counter() - job.arrived_at
