"""The compiled decode step (static cache, fullgraph) gives the eager engine's tokens and compiles once: after a
warm-up, 32+ decode steps at new positions, with rows joining and leaving, run with recompiles turned into
errors. On GPU the step also runs as a CUDA graph (mode "reduce-overhead")."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import BYTE, tiny_model

from tokenmill.errors import UserError
from tokenmill.generation import Generator, SamplingParams


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_decode_never_recompiles_and_matches_eager(device):
    model = tiny_model(max_seq_len=64).to(device)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    compiled = Generator(model, BYTE, max_batch_size=4, compile=True)
    compiled.generate(["warm"], SamplingParams(max_new_tokens=3, temperature=0))  # compiles the decode step
    prompts = ["a", "hello", "x" * 20, "bc"]
    torch._dynamo.config.error_on_recompile = True
    try:
        got = compiled.generate(prompts, params)
        mixed = compiled.generate(["q", "rs"], SamplingParams(max_new_tokens=33, temperature=0.9, seed=1))
    finally:
        torch._dynamo.config.error_on_recompile = False
    eager = Generator(model, BYTE, max_batch_size=4)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(prompts, params)]
    assert [c.token_ids for c in mixed] == [
        c.token_ids for c in eager.generate(["q", "rs"], SamplingParams(max_new_tokens=33, temperature=0.9, seed=1))
    ]


def test_compiled_flex_on_cpu_is_refused_in_one_line():
    with pytest.raises(UserError, match="compile=True with model.attention=flex only runs on CUDA"):
        Generator(tiny_model(attention="flex"), BYTE, compile=True)
