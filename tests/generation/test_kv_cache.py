"""The KV cache reproduces the plain forward: per-step logits within 1e-5 in fp32 and greedy tokens identical,
for learned and rotary positions, MHA and GQA, with and without QK-norm, for short, medium and near-full
prompts, on every CPU attention backend."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from gen_helpers import BYTE, reference_greedy, tiny_model

from tokenmill.errors import UserError
from tokenmill.generation import Generator, SamplingParams
from tokenmill.model.attention import SDPABackend
from tokenmill.model.kv_cache import KVCache, cached_causal_mask
from tokenmill.model.position import apply_rope, apply_rope_rolled, rolled_rope_tables

MAX = 48
GRID = list(itertools.product(["rope", "learned"], [0, 2], [False, True], [1, 7, MAX - 8]))


@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def tokens(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def cached_logits(model, idx: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, T - prompt_len + 1, V): prefill the prompt, then feed the rest of idx one token at a time."""
    B, T = idx.shape
    cache = KVCache.allocate(model.cfg, B, T, "cpu", torch.float32)
    rows = slice(0, B)
    steps = [
        model.next_logits(idx[:, :prompt_len], torch.arange(prompt_len).expand(B, -1), cache.view(rows, prompt_len))
    ]
    for t in range(prompt_len, T):
        steps.append(model.next_logits(idx[:, t : t + 1], torch.full((B, 1), t), cache.view(rows, t + 1)))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("position,n_kv_heads,qk_norm,prompt_len", GRID)
def test_per_step_logits_equal_the_full_forward(position, n_kv_heads, qk_norm, prompt_len):
    model = tiny_model(position=position, n_kv_heads=n_kv_heads, qk_norm=qk_norm, max_seq_len=MAX)
    idx = tokens(MAX)
    with torch.no_grad():
        full = model(idx)[:, prompt_len - 1 :]  # logits after each prefix of length >= prompt_len
        cached = cached_logits(model, idx, prompt_len)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position,n_kv_heads,qk_norm,prompt_len", GRID)
def test_cached_greedy_equals_uncached_greedy(position, n_kv_heads, qk_norm, prompt_len):
    model = tiny_model(position=position, n_kv_heads=n_kv_heads, qk_norm=qk_norm, max_seq_len=MAX)
    prompt = tokens(prompt_len, B=1, seed=prompt_len)[0].tolist()
    [got] = Generator(model, BYTE).generate([prompt], SamplingParams(max_new_tokens=MAX, temperature=0))
    expected = reference_greedy(model, prompt, MAX, BYTE.vocab_size, BYTE.eos_id)
    assert got.token_ids == expected
    assert len(prompt) + len(got.token_ids) == MAX or got.finish_reason == "stop"


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex"])
def test_every_cpu_backend_decodes_like_the_full_forward(attention):
    model = tiny_model(attention=attention, qk_norm=True, max_seq_len=32)
    idx = tokens(32)
    with torch.no_grad():
        torch.testing.assert_close(cached_logits(model, idx, 5), model(idx)[:, 4:], atol=1e-5, rtol=0)


def test_rows_at_different_positions_are_independent():
    """Row 0 decodes at position 9 while row 1 is at position 3: each equals its own full forward."""
    model = tiny_model(position="learned", max_seq_len=32)
    long, short = tokens(10, B=1, seed=2), tokens(4, B=1, seed=3)
    cache = KVCache.allocate(model.cfg, 2, 16, "cpu", torch.float32)
    with torch.no_grad():
        # right-padded prefill: row 1's padding lands in slots it overwrites before it can see them
        padded = torch.cat([long[:, :9], torch.cat([short[:, :3], torch.zeros(1, 6, dtype=torch.long)], 1)])
        model.next_logits(padded, torch.arange(9).expand(2, -1), cache.view(slice(0, 2), 9), torch.tensor([8, 2]))
        step = model.next_logits(
            torch.tensor([[long[0, 9]], [short[0, 3]]]), torch.tensor([[9], [3]]), cache.view(slice(0, 2), 10)
        )
        torch.testing.assert_close(step[0], model(long)[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[1], model(short)[0, -1], atol=1e-5, rtol=0)


def test_cache_holds_kv_heads_at_the_configured_head_dim():
    model = tiny_model(n_heads=4, n_kv_heads=1, head_dim=6)
    cache = KVCache.allocate(model.cfg, 3, 20, "cpu", torch.float32)
    assert cache.keys[0].shape == (3, 1, 20, 6) and len(cache.values) == model.cfg.n_layers
    assert KVCache.allocate(model.cfg, 1, 10_000, "cpu", torch.float32).span == model.cfg.max_seq_len


def test_cached_mask_is_aligned_bottom_right_per_row():
    mask = cached_causal_mask(torch.tensor([[2, 3], [0, 1]]), span=4)[:, 0].int()
    assert mask.tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 0, 0, 0], [1, 1, 0, 0]]]


def test_training_forward_is_unchanged_by_explicit_positions():
    model = tiny_model(position="learned")
    idx = tokens(12)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, positions=torch.arange(12).expand(2, -1)), model(idx), atol=0, rtol=0)
        shifted = model(idx, positions=torch.arange(12).expand(2, -1) + 3)
    assert not torch.allclose(shifted, model(idx))  # positions really reach the learned table


def test_a_cached_forward_needs_positions():
    model = tiny_model()
    cache = KVCache.allocate(model.cfg, 1, 8, "cpu", torch.float32)
    with pytest.raises(UserError, match="positions"):
        model(tokens(4, B=1), cache=cache)


def test_bf16_autocast_writes_into_an_fp32_cache():
    model = tiny_model(max_seq_len=32)
    idx = tokens(12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cached = cached_logits(model, idx, 5)
    with torch.no_grad():
        full = model(idx)[:, 4:]
    torch.testing.assert_close(cached.float(), full, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rope_of_the_cached_path_equals_the_training_rope_bit_for_bit(dtype):
    model = tiny_model(position="rope")
    positions = torch.tensor([[0, 5, 17], [3, 3, 40]])
    x = torch.randn(2, 3, 4, model.cfg.resolved_head_dim()).to(dtype)  # (B, T, H, hd)
    half = model.rope.tables(positions)
    rolled = apply_rope_rolled(x, *rolled_rope_tables(*half))
    assert rolled.dtype == dtype
    torch.testing.assert_close(rolled, apply_rope(x, *half), atol=0, rtol=0)
    assert not torch.equal(rolled, x)  # positions > 0 really rotate


def test_sdpa_cached_mask_is_additive_with_the_bottom_right_rule():
    positions = torch.tensor([[2, 3], [0, 1]])
    mask = SDPABackend().prepare_cached(positions, span=4)
    assert mask.dtype == torch.float32
    assert torch.equal(mask == 0, cached_causal_mask(positions, span=4))
    assert torch.isinf(mask[mask != 0]).all() and (mask[mask != 0] < 0).all()
