"""The generation engine: batching does not change results, seeds reproduce, samples are independent from their
first token, stops and the context limit end samples with the right finish_reason, streams are UTF-8 and
stop-string safe, requests from several threads join one batch."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from gen_helpers import BYTE, ScriptedModel, reference_greedy, tiny_model

from tokenmill.errors import UserError
from tokenmill.generation import Generator, SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_batched_mixed_length_prompts_equal_one_by_one(position):
    model = tiny_model(position=position)
    prompts = ["a", "hello there", "x" * 30, "def f():"]
    batched = Generator(model, BYTE).generate(prompts, GREEDY)
    for i, prompt in enumerate(prompts):
        [alone] = Generator(model, BYTE, max_batch_size=1).generate([prompt], GREEDY)
        assert batched[i].prompt_index == i
        assert batched[i].token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(batched[i].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
        assert batched[i].token_ids == reference_greedy(model, byte_ids(prompt), 12, BYTE.vocab_size, BYTE.eos_id)


def test_more_requests_than_rows_join_as_rows_free_up():
    """max_batch_size=2 with 5 prompts of different budgets: rows are reused, results are unchanged."""
    model = tiny_model()
    prompts = ["ab", "cde", "f", "ghij", "k"]
    params = [SamplingParams(max_new_tokens=m, temperature=0) for m in (3, 9, 5, 1, 7)]
    small = Generator(model, BYTE, max_batch_size=2)
    requests = [small.submit(p, q, i) for i, (p, q) in enumerate(zip(prompts, params))]
    got = [r.completions()[0] for r in requests]
    for prompt, q, c in zip(prompts, params, got):
        [alone] = Generator(model, BYTE).generate([prompt], q)
        assert c.token_ids == alone.token_ids and len(c.token_ids) == q.max_new_tokens


def test_logprobs_are_the_models_log_softmax():
    model = tiny_model()
    [c] = Generator(model, BYTE).generate(
        ["abc"], SamplingParams(max_new_tokens=4, temperature=0.7, seed=3, logprobs=True)
    )
    ids = byte_ids("abc") + c.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [float(logp[2 + k, t]) for k, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Randomness


def test_same_seed_same_text_and_batch_neighbours_do_not_matter():
    model = tiny_model()
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    [a] = Generator(model, BYTE).generate(["once upon"], params)
    b = Generator(model, BYTE).generate(["zzz", "once upon", "q"], params)[1]
    [other] = Generator(model, BYTE).generate(["once upon"], SamplingParams(**{**params.__dict__, "seed": 8}))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert other.token_ids != a.token_ids


def test_n_samples_differ_from_their_first_token_under_uniform_logits():
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight.zero_()  # hidden state 0 -> all logits 0: every token equally likely
    params = SamplingParams(max_new_tokens=1, temperature=1.0, n=8, seed=0)
    completions = Generator(model, BYTE).generate(["hi"], params)
    assert [c.sample_index for c in completions] == list(range(8))
    first = [c.token_ids[0] for c in completions]
    assert len(set(first)) >= 6  # 8 draws from 259 tokens: a shared first token would give 1


def test_generation_leaves_the_global_rng_and_training_mode_alone():
    model = tiny_model()
    model.train()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    Generator(model, BYTE).generate(["abc"], SamplingParams(max_new_tokens=5, seed=1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert model.training


# ---------------------------------------------------------------------------------------------------------------
# Finishing


def test_length_at_the_token_budget_and_at_the_context_limit():
    gen = Generator(ScriptedModel(byte_ids("abcdefghij" * 10), prompt_len=3, max_seq_len=20), BYTE)
    [budget] = gen.generate(["xyz"], SamplingParams(max_new_tokens=5))
    assert (budget.text, budget.finish_reason) == ("abcde", "length")
    gen = Generator(ScriptedModel(byte_ids("abcdefghij" * 10), prompt_len=16, max_seq_len=20), BYTE)
    [context] = gen.generate(["x" * 16], SamplingParams(max_new_tokens=100))
    assert (context.text, context.finish_reason) == ("abcd", "length")  # prompt + completion = max_seq_len


def test_eos_stops_with_stop_and_is_in_token_ids_only():
    model = ScriptedModel(byte_ids("ok") + [BYTE.eos_id] + byte_ids("never"), prompt_len=1)
    [c] = Generator(model, BYTE).generate(["x"], SamplingParams(max_new_tokens=50))
    assert (c.text, c.finish_reason, c.token_ids) == ("ok", "stop", byte_ids("ok") + [BYTE.eos_id])


def test_stop_strings_never_leak_into_the_stream():
    text = "say STOx then STOP and more"
    model = ScriptedModel(byte_ids(text), prompt_len=1)
    deltas = list(Generator(model, BYTE).stream("x", SamplingParams(max_new_tokens=100, stop=("STOP", "never"))))
    shown = "".join(d.text for d in deltas)
    assert shown == "say STOx then "
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    # "STOx" was held back while it could still become "STOP", then released whole
    assert any(d.text.endswith("STOx") for d in deltas)
    assert sum(len(d.token_ids) for d in deltas) == len("say STOx then STOP")


def test_held_back_text_is_released_when_the_budget_ends():
    model = ScriptedModel(byte_ids("abcST"), prompt_len=1)
    [c] = Generator(model, BYTE).generate(["x"], SamplingParams(max_new_tokens=5, stop=("STOP",)))
    assert (c.text, c.finish_reason) == ("abcST", "length")


def test_multibyte_characters_stream_intact():
    text = "héllo 🙂 wörld ∑"
    model = ScriptedModel(byte_ids(text) + [BYTE.eos_id], prompt_len=1)
    deltas = list(Generator(model, BYTE).stream("x", SamplingParams(max_new_tokens=100)))
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert len(deltas) == len(text.encode("utf-8")) + 1  # one delta per token, some with no text yet


# ---------------------------------------------------------------------------------------------------------------
# Requests, threads, bad input


def test_requests_from_several_threads_share_a_worker():
    model = tiny_model()
    gen = Generator(model, BYTE, max_batch_size=3).start()
    results: dict[int, list[int]] = {}
    try:

        def ask(i: int) -> None:
            results[i] = (
                gen.submit(f"prompt {i}", SamplingParams(max_new_tokens=6, temperature=0)).completions()[0].token_ids
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        gen.close()
    for i in range(5):
        assert results[i] == reference_greedy(model, byte_ids(f"prompt {i}"), 6, BYTE.vocab_size, BYTE.eos_id)


class QueueThatWakesLate(queue.SimpleQueue):
    """A request's delta queue whose first timed wait reports Empty only after `late` items arrived: the consumer
    slept through the rest of its request (a descheduled thread on a busy machine)."""

    late = 0

    def get(self, block=True, timeout=None):
        if timeout is not None and not getattr(self, "slept", False):
            self.slept = True
            deadline = time.monotonic() + 30
            while self.qsize() < self.late and time.monotonic() < deadline:
                time.sleep(0.01)
            raise queue.Empty
        return super().get(block, timeout)


def test_a_consumer_that_wakes_after_its_request_finished_gets_every_delta(monkeypatch):
    script = [ord(c) for c in "late"]  # no EOS: four deltas, then the end marker
    monkeypatch.setattr(QueueThatWakesLate, "late", len(script) + 1)
    monkeypatch.setattr(queue, "SimpleQueue", QueueThatWakesLate)
    gen = Generator(ScriptedModel(script, prompt_len=3), BYTE).start()
    try:
        deltas = list(gen.submit("abc", SamplingParams(max_new_tokens=len(script))))
    finally:
        gen.close()
    assert "".join(d.text for d in deltas) == "late"
    assert deltas[-1].finish_reason == "length"


def test_a_cancelled_request_ends_its_stream():
    gen = Generator(tiny_model(), BYTE)
    # seeded: unseeded, a sample could draw EOS within its first tokens and complete before the cancel (failed CI once)
    request = gen.submit("abc", SamplingParams(max_new_tokens=40, n=2, seed=0))
    stream = iter(request)
    next(stream)
    request.cancel()
    rest = list(stream)  # only what the step already run had produced
    assert len(rest) < 6 and all(d.finish_reason is None for d in rest)
    assert request.completions() == []
    assert gen.step() is False  # nothing left running


def test_prompt_that_fills_the_context_is_refused():
    gen = Generator(tiny_model(max_seq_len=16), BYTE)
    with pytest.raises(UserError, match="leaves no room"):
        gen.generate(["short", "x" * 16], SamplingParams())
    assert gen.step() is False  # the valid prompt was not queued either


def test_bad_settings_and_token_ids_are_user_errors():
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(UserError, match="vocabulary"):
        Generator(tiny_model(), BYTE).generate([[1, 2, 999]])


def test_empty_prompt_starts_after_an_eos():
    model = tiny_model()
    [empty] = Generator(model, BYTE).generate([""], GREEDY)
    [eos] = Generator(model, BYTE).generate([[BYTE.eos_id]], GREEDY)
    assert empty.token_ids == eos.token_ids
