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

from tokenmill.errors import UserError
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
    logprobs: bool = False
    token_text: Any = None  # token id -> its text, for logprobs
    record: RequestRecord = field(default_factory=lambda: RequestRecord("-", 200))

    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def plan_completion(request: schema.CompletionRequest, served: ServedModel, settings: ServeSettings) -> Plan:
    check_model_name(request.model, settings)
    if request.logprobs is not None and request.echo:
        raise APIError(
            400, "logprobs with echo (log-probabilities of the prompt) is not supported by this server", "logprobs"
        )
    prompts, texts = [], []
    for prompt in request.prompts():
        # an empty prompt starts from <|eos|>, which is what precedes every document in training
        ids = (served.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt) or [served.tokenizer.eos_id]
        if any(i >= served.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be below the vocabulary size {served.vocab_size}", "prompt")
        prompts.append(ids)
        texts.append(prompt if isinstance(prompt, str) else served.tokenizer.decode(ids))
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    limits = served.limits(settings)
    schema.check_limits(limits, [len(p) for p in prompts], max_tokens, request.n)
    params = served.sampling_params(request, max_tokens, request.stop_list(), request.logprobs is not None)
    return Plan(
        False,
        Envelope.new("cmpl", settings.model_name),
        prompts,
        texts,
        params,
        request.n,
        request.stream,
        request.include_usage(),
        echo=request.echo,
        logprobs=request.logprobs is not None,
        token_text=served.token_text,
    )


def plan_chat(request: schema.ChatRequest, served: ServedModel, settings: ServeSettings) -> Plan:
    check_model_name(request.model, settings)
    if served.chat_template is None:
        raise APIError(
            400,
            f"model {settings.model_name!r} is a base model: its checkpoint records no chat template, "
            f"so it cannot serve /v1/chat/completions; use /v1/completions, or serve a fine-tuned "
            f"checkpoint with chat_template.jinja or tokenizer_config.json",
            "messages",
            "chat_template_missing",
        )
    if request.top_logprobs:
        raise APIError(
            400,
            "top_logprobs is not supported by this server: it reports the sampled token's "
            "logprob only (use top_logprobs: 0)",
            "top_logprobs",
        )
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in request.messages]
    try:
        text = served.chat_template.render(messages)
    except UserError as err:
        raise APIError(400, str(err), "messages") from None
    ids = encode_chat_prompt(served.tokenizer, text)
    limits = served.limits(settings)
    budget = request.token_budget()
    max_tokens = budget if budget is not None else max(1, min(limits.max_tokens, limits.context_tokens - len(ids)))
    schema.check_limits(limits, [len(ids)], max_tokens, request.n)
    stops = request.stop_list() + end_of_turn_stops(served.chat_template, served.tokenizer)
    params = served.sampling_params(request, max_tokens, stops, request.logprobs)
    return Plan(
        True,
        Envelope.new("chatcmpl", settings.model_name),
        [ids],
        [text],
        params,
        request.n,
        request.stream,
        request.include_usage(),
        logprobs=request.logprobs,
        token_text=served.token_text,
    )


def check_model_name(name: str | None, settings: ServeSettings) -> None:
    if name is not None and name != settings.model_name:
        raise APIError(
            404,
            f"The model {name!r} does not exist: this server serves {settings.model_name!r}",
            "model",
            "model_not_found",
        )


async def collect(plan: Plan, job: Job) -> dict[str, Any]:
    """The whole (non-streamed) response once every choice has finished."""
    count = len(plan.prompts) * plan.n
    texts: dict[int, list[str]] = {i: [] for i in range(count)}
    token_ids: dict[int, list[int]] = {i: [] for i in range(count)}
    logprobs: dict[int, list[float]] = {i: [] for i in range(count)}
    finish: dict[int, str] = {}
    async for piece in job.pieces():
        _note_first_token(plan, job)
        texts[piece.choice].append(piece.text)
        token_ids[piece.choice].extend(piece.token_ids)
        logprobs[piece.choice].extend(piece.logprobs or ())
        if piece.finish_reason is not None:
            finish[piece.choice] = piece.finish_reason
    tokens = sum(len(ids) for ids in token_ids.values())
    plan.record.completion_tokens = tokens
    choices = []
    for i in range(count):
        scores = _logprobs(plan, token_ids[i], logprobs[i], len(_echo(plan, i))) if plan.logprobs else None
        if plan.chat:
            choices.append(schema.chat_choice(i, "".join(texts[i]), finish.get(i, "length"), scores))
        else:
            choices.append(
                schema.completion_choice(i, _echo(plan, i) + "".join(texts[i]), finish.get(i, "length"), scores)
            )
    build = schema.chat_response if plan.chat else schema.completion_response
    return build(plan.env, choices, schema.usage(job.prompt_tokens(), tokens))


async def stream(plan: Plan, job: Job) -> AsyncIterator[bytes]:
    """Server-sent events: pieces as they are generated, the usage chunk if asked for, then [DONE].

    A failure after the first byte cannot change the HTTP status any more, so it is sent in-band as an
    OpenAI error object (the SDK raises APIError on it); a client that goes away cancels the job.
    """
    tokens = 0
    choices = range(len(plan.prompts) * plan.n)
    offsets = {i: len(_echo(plan, i)) for i in choices}  # text offset of each choice's next token
    try:
        for i in choices:  # first chunk of each choice: the chat role, or the echoed prompt
            if plan.chat:
                yield schema.sse(
                    schema.chat_chunk(plan.env, i, {"role": "assistant", "content": ""}, None, plan.include_usage)
                )
            elif plan.echo:
                yield schema.sse(
                    schema.completion_chunk(
                        plan.env, schema.completion_choice(i, _echo(plan, i), None), plan.include_usage
                    )
                )
        async for piece in job.pieces():
            _note_first_token(plan, job)
            tokens += len(piece.token_ids)
            if not piece.text and piece.finish_reason is None and not plan.logprobs:
                continue  # text held back (a possible stop string, an incomplete character): nothing to show yet
            scores = None
            if plan.logprobs:
                scores = _logprobs(plan, list(piece.token_ids), list(piece.logprobs or ()), offsets[piece.choice])
                offsets[piece.choice] += len(piece.text)
            if plan.chat:
                delta = {"content": piece.text} if piece.text else {}
                chunk = schema.chat_chunk(
                    plan.env, piece.choice, delta, piece.finish_reason, plan.include_usage, scores
                )
            else:
                chunk = schema.completion_chunk(
                    plan.env,
                    schema.completion_choice(piece.choice, piece.text, piece.finish_reason, scores),
                    plan.include_usage,
                )
            yield schema.sse(chunk)
        if plan.include_usage:
            kind = "chat.completion.chunk" if plan.chat else "text_completion"
            yield schema.sse(schema.usage_chunk(plan.env, kind, schema.usage(job.prompt_tokens(), tokens)))
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


def _logprobs(plan: Plan, token_ids: list[int], logprobs: list[float], offset: int) -> dict[str, Any]:
    """The logprobs object of one choice (or one chunk of it), in the endpoint's format.

    Only the sampled tokens' log-probabilities are known (the engine reports no alternatives), so
    `top_logprobs` is null on /v1/completions and empty on chat.
    """
    pieces = [plan.token_text(i) for i in token_ids]
    if plan.chat:
        return {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(pieces, logprobs, strict=True)
            ],
            "refusal": None,
        }
    starts = []
    for piece in pieces:
        starts.append(offset)
        offset += len(piece)
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": starts}


def _note_first_token(plan: Plan, job: Job) -> None:
    if plan.record.first_token_s is None:
        plan.record.first_token_s = time.perf_counter() - job.arrived_at
