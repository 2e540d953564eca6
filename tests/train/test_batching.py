"""Batch plan: accumulation derived from tokens, clear errors when numbers do not divide, Chinchilla default."""

import pytest

from tokenmill.errors import ConfigError
from tokenmill.train.batching import plan_batches


def test_accumulation_is_derived_from_global_batch():
    plan = plan_batches(
        micro_batch_size=4,
        seq_len=256,
        world_size=2,
        global_batch_tokens=8192,
        total_tokens=81920,
        max_steps=0,
        n_params=10,
    )
    assert plan.grad_accum == 4
    assert plan.tokens_per_step == 8192
    assert plan.total_steps == 10


def test_non_dividing_global_batch_names_the_numbers():
    with pytest.raises(ConfigError) as err:
        plan_batches(4, 256, 2, 10000, 0, 10, 10)
    msg = str(err.value)
    assert "train.global_batch_tokens=10000" in msg and "4 x 256 x 2 = 2048" in msg and "8192" in msg


def test_budget_defaults_to_twenty_tokens_per_parameter():
    plan = plan_batches(2, 100, 1, 0, 0, 0, n_params=1000)
    assert plan.grad_accum == 1 and plan.total_steps == 100  # 20 x 1000 / 200
    assert plan_batches(2, 100, 1, 0, 0, 7, n_params=1000).total_steps == 7  # max_steps wins
