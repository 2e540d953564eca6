"""BatchSampler: each filter keeps exactly the tokens it should, rows do not influence each other, and the
exponential race samples from the right distribution."""

from __future__ import annotations

import torch

from tokenmill.generation.params import SamplingParams
from tokenmill.generation.sampling import BatchSampler

V = 10


def sampler(params: list[SamplingParams], seed: int = 0, vocab_limit: int = V) -> BatchSampler:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
    return BatchSampler(params, generators, vocab_limit, torch.device("cpu"))


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 400, vocab_limit: int = V) -> set[int]:
    s = sampler([params], vocab_limit=vocab_limit)
    return {int(s(logits[None], None)[0][0]) for _ in range(n)}


LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])


def test_greedy_is_the_argmax_and_ignores_filters():
    tokens, _ = sampler([SamplingParams(temperature=0, top_k=3)])(LOGITS[None].roll(3, -1), None)
    assert tokens.tolist() == [3]


def test_top_k_keeps_the_k_most_likely():
    assert draws(SamplingParams(temperature=5.0, top_k=3), LOGITS) == {0, 1, 2}


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 6)
    logits = probs.clamp(min=1e-9).log()
    assert draws(SamplingParams(top_p=0.7), logits) == {0, 1}
    assert draws(SamplingParams(top_p=0.81), logits) == {0, 1, 2}


def test_min_p_drops_tokens_far_below_the_best():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05] + [0.0] * 5)
    assert draws(SamplingParams(min_p=0.4), probs.clamp(min=1e-9).log()) == {0, 1, 2}


def test_repetition_penalty_demotes_seen_tokens():
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, 0] = True
    tokens, _ = sampler([SamplingParams(temperature=0, repetition_penalty=1.5)])(LOGITS[None], seen)
    assert tokens.tolist() == [1]  # 4 / 1.5 < 3
    tokens, _ = sampler([SamplingParams(temperature=0, repetition_penalty=1.2)])(LOGITS[None], seen)
    assert tokens.tolist() == [0]  # 4 / 1.2 > 3


def test_ids_past_the_vocab_limit_are_never_chosen():
    logits = torch.zeros(V)
    logits[8:] = 50.0
    assert draws(SamplingParams(), logits, vocab_limit=8) <= set(range(8))


def test_rows_with_different_settings_do_not_interact():
    alone = sampler([SamplingParams(seed=1)], seed=5)
    mixed = BatchSampler(
        [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(top_k=2)],
        [torch.Generator().manual_seed(s) for s in (9, 5, 7)],
        V,
        torch.device("cpu"),
    )
    for _ in range(20):
        assert int(mixed(torch.stack([LOGITS] * 3), None)[0][1]) == int(alone(LOGITS[None], None)[0][0])


def test_exponential_race_matches_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    s = sampler([SamplingParams(temperature=1.0)])
    counts = torch.bincount(torch.tensor([int(s(logits[None], None)[0][0]) for _ in range(20000)]), minlength=V)
    torch.testing.assert_close(counts / 20000, logits.softmax(-1), atol=0.015, rtol=0)


def test_logprobs_are_of_the_raw_distribution():
    tokens, logprobs = sampler([SamplingParams(temperature=0.5, top_k=2, logprobs=True)])(LOGITS[None], None)
    assert float(logprobs[0]) == float(LOGITS.log_softmax(-1)[tokens[0]])
