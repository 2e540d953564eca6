"""The official `openai` client against a live server: every answer must pass the SDK's strict schema check.

One exception, on purpose: the SDK types `Completion.choices[].finish_reason` as non-null, yet OpenAI itself
streams legacy completions with `finish_reason: null` until the last chunk (openai/openai-openapi#100), and so
does this server. Streamed /v1/completions are therefore read with a non-strict client and checked here.
"""

from __future__ import annotations

import pytest
from serve_helpers import MODEL_NAME, openai

PROMPT = "def add(a, b):"


def complete(server, **kwargs):
    return server.client().completions.create(model=MODEL_NAME, **kwargs)


def streamed_completion(server, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """(text per choice, finish_reason per choice, chunks) of a streamed completion, read without strict types."""
    chunks = list(server.client(strict=False).completions.create(model=MODEL_NAME, stream=True, **kwargs))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finish, "a chunk came after its choice's finish_reason"
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.finish_reason in ("stop", "length")
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def test_models_list(base_server):
    models = base_server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert base_server.client().models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_usage_and_finish_reason(base_server):
    answer = complete(base_server, prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion" and answer.model == MODEL_NAME
    (choice,) = answer.choices
    assert choice.index == 0 and choice.finish_reason == "length" and len(choice.text) == 12
    assert answer.usage.prompt_tokens == len(PROMPT)  # one token per character
    assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_stream_equals_non_stream_at_temperature_zero(base_server):
    whole = complete(base_server, prompt=PROMPT, max_tokens=16, temperature=0).choices[0]
    texts, finish, chunks = streamed_completion(
        base_server, prompt=PROMPT, max_tokens=16, temperature=0, stream_options={"include_usage": True}
    )
    assert texts == {0: whole.text} and finish == {0: whole.finish_reason}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.prompt_tokens == len(PROMPT)


def test_n_choices_and_seed_reproducibility(base_server):
    first = complete(base_server, prompt=PROMPT, max_tokens=20, temperature=1.0, n=2, seed=11, logprobs=0)
    again = complete(base_server, prompt=PROMPT, max_tokens=20, temperature=1.0, n=2, seed=11)
    other = complete(base_server, prompt=PROMPT, max_tokens=20, temperature=1.0, n=2, seed=12)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]  # same seed, same samples
    assert texts[0] != texts[1]  # each sample draws its own tokens
    assert texts != [c.text for c in other.choices]
    for choice in first.choices:  # logprobs name every generated token, the <|eos|> that stopped a sample too
        tokens = choice.logprobs.tokens
        assert len(tokens) == len(choice.logprobs.token_logprobs) <= 20
        assert all(lp <= 0.0 for lp in choice.logprobs.token_logprobs)
        assert "".join(tokens).startswith(choice.text)
        assert len(tokens) == 20 if choice.finish_reason == "length" else tokens[-1] == "<|eos|>"
    assert first.usage.prompt_tokens == len(PROMPT)
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices)


def test_two_prompts_number_choices_prompt_major(base_server):
    prompts = ["abc", "xyz"]
    answer = complete(base_server, prompt=prompts, max_tokens=6, temperature=0, n=2)
    by_index = {c.index: c.text for c in answer.choices}
    assert sorted(by_index) == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = complete(base_server, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        assert by_index[2 * p] == by_index[2 * p + 1] == alone
    assert answer.usage.prompt_tokens == 6


def test_stop_string_trims_without_leaking(base_server):
    sampled = complete(base_server, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=5).choices[0].text
    assert len(sampled) >= 8
    stop = sampled[5:7]
    expected = sampled[: sampled.index(stop)]
    stopped = complete(base_server, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=5, stop=[stop, "\x00"])
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    texts, finish, _ = streamed_completion(
        base_server, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=5, stop=stop
    )
    assert texts == {0: expected} and finish == {0: "stop"}


def test_echo_prepends_the_prompt(base_server):
    plain = complete(base_server, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    echoed = complete(base_server, prompt=PROMPT, max_tokens=5, temperature=0, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    texts, _, _ = streamed_completion(base_server, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert texts == {0: PROMPT + plain}


def test_greedy_text_equals_the_engine(base_server, base_run):
    import tokenmill
    from tokenmill.generation.engine import Generator, SamplingParams

    served = complete(base_server, prompt=PROMPT, max_tokens=16, temperature=0).choices[0]
    engine = Generator(tokenmill.load_model(base_run), tokenmill.load_tokenizer(base_run))
    (reference,) = engine.generate([PROMPT], SamplingParams(max_new_tokens=16, temperature=0.0))
    assert served.text == reference.text and served.finish_reason == reference.finish_reason
    (generated,) = tokenmill.generate(base_run, [PROMPT], max_new_tokens=16, temperature=0.0, device="cpu")
    assert served.text == generated.text


def test_chat_completion_on_a_template_model(chat_server):
    client = chat_server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # the template renders "<|bos|>system: be brief<|eos|><|bos|>user: hello<|eos|><|bos|>assistant: "
    assert answer.usage.prompt_tokens == 5 + len("system: be brief") + len("user: hello") + len("assistant: ")
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].finish_reason == choice.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in content) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens
    assert sum(c.usage is not None for c in chunks) == 1


def test_chat_on_a_base_model_is_a_400(base_server):
    with pytest.raises(openai.BadRequestError, match="base model"):
        base_server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])


def test_prompt_longer_than_the_context_is_a_400(base_server):
    with pytest.raises(openai.BadRequestError, match="context"):
        complete(base_server, prompt="x" * 200, max_tokens=4)
