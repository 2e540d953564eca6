"""Column-major decode weights (generation/layout.py): the same parameters, values and results in another memory
layout, and only for a model the generator has to itself."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import BYTE, V, tiny_model

from tokenmill.generation import Generator, SamplingParams
from tokenmill.generation.layout import HUGE_PAGE, WeightArena, apply_column_major, decode_weights

PROMPTS = ["hello", "a", "the quick brown fox"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_column_major_keeps_parameters_values_and_shapes(tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    matrices = decode_weights(model)
    assert (
        apply_column_major(model) == len(matrices) == 2 * (4 + 3) + 1
    )  # 2 layers x (q, k, v, o, gate, up, down) + head
    for name, p in model.named_parameters():
        param, values = before[name]
        assert p is param  # optimizers and tied weights keep pointing at the same objects
        assert torch.equal(p, values)
    for w in matrices:
        assert w.stride() == (1, w.shape[0])  # column-major
    assert model.output_weight() is model.tok_emb.weight or not tie_embeddings
    assert apply_column_major(model) == 0  # already done: nothing moves


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_column_major_decodes_the_same_tokens_and_logits(position):
    plain, relaid = tiny_model(position=position), tiny_model(position=position)
    apply_column_major(relaid)
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(relaid(idx), plain(idx), atol=1e-5, rtol=1e-5)
    want = [c.token_ids for c in Generator(plain, BYTE).generate(PROMPTS, GREEDY)]
    assert [c.token_ids for c in Generator(relaid, BYTE).generate(PROMPTS, GREEDY)] == want


def test_only_an_exclusive_generator_changes_the_layout():
    shared = tiny_model()
    Generator(shared, BYTE).generate(["hi"], GREEDY)
    assert all(p.is_contiguous() for p in shared.parameters())  # a model being trained stays as it was
    owned = tiny_model()
    want = [c.token_ids for c in Generator(shared, BYTE).generate(PROMPTS, GREEDY)]
    assert [c.token_ids for c in Generator(owned, BYTE, exclusive=True).generate(PROMPTS, GREEDY)] == want
    assert not all(w.is_contiguous() for w in decode_weights(owned))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fused-step", "modules"])
def test_an_exclusive_generator_keeps_its_decode_matrices_in_one_huge_page_aligned_block(dtype):
    model = tiny_model().to(dtype)
    want = [c.token_ids for c in Generator(tiny_model().to(dtype), BYTE).generate(PROMPTS, GREEDY)]
    assert [c.token_ids for c in Generator(model, BYTE, exclusive=True).generate(PROMPTS, GREEDY)] == want
    matrices = decode_weights(model)
    assert len({w.untyped_storage().data_ptr() for w in matrices}) == 1  # one block
    start = min(w.data_ptr() for w in matrices)
    assert start % HUGE_PAGE == 0
    # the last element of each matrix (fused ones are column slices of one matrix): the block ends right after
    # the matrices, which overlap nowhere (equal tokens above), so it holds them and nothing else
    end = max(
        w.data_ptr() + (1 + sum((n - 1) * st for n, st in zip(w.shape, w.stride()))) * w.element_size()
        for w in matrices
    )
    assert end - start == sum(w.numel() * w.element_size() for w in matrices)


def test_an_arena_refuses_more_than_it_holds():
    arena = WeightArena(12, torch.float32)
    assert arena.take(3, 4).shape == (3, 4)
    with pytest.raises(ValueError, match="holds 12 elements; 13 asked"):
        arena.take(1, 1)
