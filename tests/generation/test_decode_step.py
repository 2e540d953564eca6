"""The fused one-token decode step (generation/decode_step.py, and its C version in generation/native_step.py)
computes what the model's cached forward computes, from the same parameters, for every model shape it accepts;
the others decode through the model."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import BYTE, V, tiny_model

from tokenmill.generation import Generator, SamplingParams
from tokenmill.generation.decode_step import build_decode_step
from tokenmill.generation.layout import WeightArena, fuse_linears
from tokenmill.generation.native_step import NativeDecodeStep, load_kernel
from tokenmill.model.kv_cache import KVCache

STEPS = [pytest.param(True, id="native"), pytest.param(False, id="python")]


def _build(model, native: bool):
    """The C step where a compiler is at hand (CI has one; loaded inside the test, so it compiles under the test's
    cache folder), the Python one everywhere."""
    if native and load_kernel() is None:
        pytest.skip("no C compiler: the native decode step falls back to the Python one")
    step = build_decode_step(model, native=native)
    assert isinstance(step, NativeDecodeStep) == native
    return step


SHAPES = {
    "llama": {},
    "gpt2": {"position": "learned", "norm": "layernorm", "ffn": "mlp", "activation": "gelu_tanh", "bias": True},
    "untied-softcap": {"tie_embeddings": False, "logit_softcap": 5.0},
    "mha-nope-nobias-ln": {"n_kv_heads": 4, "position": "none", "norm": "layernorm_nobias"},
    "relu2-mlp": {"ffn": "mlp", "activation": "relu2"},
    "gelu-mlp": {"ffn": "mlp", "activation": "gelu"},
    "silu-mlp": {"ffn": "mlp", "activation": "silu"},
    "leaky-relu-mlp": {"ffn": "mlp", "activation": "leaky_relu"},
    "qk-norm": {"qk_norm": True},
}


def model_with_varied_gains(**overrides) -> torch.nn.Module:
    """tiny_model with every norm gain drawn away from 1 (the same draw each call), so that a gain applied to the
    wrong head or layer changes the logits."""
    model = tiny_model(**overrides)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def _cached_logits(step, model, cache, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Next-token logits of one token per row through `step` (or the model's cached forward when step is None)."""
    view = cache.view(slice(0, len(tokens)), max(positions) + 1)
    with torch.inference_mode():
        if step is not None:
            return step(tokens, positions, view)
        return model.next_logits(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], view)


@pytest.mark.parametrize("native", STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("positions", [[5], [7, 7, 7], [3, 9, 6]], ids=["batch1", "same-position", "ragged"])
def test_fused_step_matches_the_models_cached_forward(shape, positions, native):
    plain, fused = model_with_varied_gains(**SHAPES[shape]), model_with_varied_gains(**SHAPES[shape])
    step = _build(fused, native)
    B = len(positions)
    caches = [KVCache.allocate(plain.cfg, B, 16, "cpu", torch.float32) for _ in range(2)]
    prompt = torch.randint(0, V, (B, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # fill slots 0..9 of every row through the model: the prefill path
        for model, cache in zip((plain, fused), caches, strict=True):
            model.next_logits(prompt, torch.arange(10).expand(B, 10), cache.view(slice(0, B), 10))
    tokens = [11 * b + 3 for b in range(B)]
    want = _cached_logits(None, plain, caches[0], tokens, positions)
    got = _cached_logits(step, fused, caches[1], tokens, positions)
    assert got.shape == (B, V)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(caches[1].keys + caches[1].values, caches[0].keys + caches[0].values, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)  # the same keys/values in the same slots


@pytest.mark.parametrize("native", STEPS)
@pytest.mark.parametrize("positions", [[5], [7, 7], [3, 9]], ids=["batch1", "same-position", "ragged"])
def test_fused_step_over_a_whole_cache_reads_and_writes_only_its_rows_and_filled_slots(positions, native):
    """The engine passes its whole cache (more rows and slots than the step needs): the result is the view's."""
    model = tiny_model()
    step = _build(model, native)
    B = len(positions)
    prompt = torch.randint(0, V, (4, 10), generator=torch.Generator().manual_seed(2))
    whole = KVCache.allocate(model.cfg, 4, 32, "cpu", torch.float32)
    with torch.inference_mode():
        model.next_logits(prompt, torch.arange(10).expand(4, 10), whole.view(slice(0, 4), 10))
        for layer in whole.keys + whole.values:
            layer[:, :, 10:] = 1e4  # slots past the filled ones: attending to them would change the logits
    viewed = KVCache([k.clone() for k in whole.keys], [v.clone() for v in whole.values])
    tokens = [11 * b + 3 for b in range(B)]
    with torch.inference_mode():
        got = step(tokens, positions, whole)
    want = _cached_logits(step, model, viewed, tokens, positions)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for mine, theirs in zip(whole.keys + whole.values, viewed.keys + viewed.values, strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)  # rows B.. and other slots untouched


@pytest.mark.parametrize("shape", ["llama", "gpt2", "qk-norm"])
@pytest.mark.parametrize(
    "prompts",
    [["hello", "a", "the quick brown fox"], ["a", "b"]],
    ids=["ragged", "one-token"],  # rows at different positions; a one-token prefill, which the fused step runs
)
@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "python"])
def test_exclusive_generator_decodes_the_same_tokens_and_logprobs(shape, prompts, native, monkeypatch):
    monkeypatch.setenv("TOKENMILL_NATIVE_DECODE", native)
    params = SamplingParams(max_new_tokens=16, temperature=0, logprobs=True)
    shared, owned = tiny_model(**SHAPES[shape]), tiny_model(**SHAPES[shape])
    plain = Generator(shared, BYTE).generate(prompts, params)
    fused = Generator(owned, BYTE, exclusive=True).generate(prompts, params)
    assert shared.decode_step is None and owned.decode_step is not None  # only a model the generator owns
    assert [c.token_ids for c in fused] == [c.token_ids for c in plain]
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_fused_weights_are_views_the_model_still_computes_with():
    model, reference = tiny_model(), tiny_model()
    attn = model.blocks[0].attn
    before = [p.detach().clone() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)]
    linears = [attn.q_proj, attn.k_proj, attn.v_proj]
    weight_t, bias = fuse_linears(linears, WeightArena.for_matrices([lin.weight for lin in linears]))
    assert bias is None
    assert weight_t.shape == (32, sum(w.shape[0] for w in before))  # (d, q + k + v outputs)
    for p, value in zip((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), before, strict=True):
        assert torch.equal(p, value)
        assert p.untyped_storage().data_ptr() == weight_t.untyped_storage().data_ptr()  # no second copy
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "dtype"),
    [({"norm_position": "post"}, torch.float32), ({}, torch.bfloat16)],
    ids=["post-norm", "bf16"],
)
def test_models_the_step_does_not_cover_decode_through_the_model(overrides, dtype):
    model = tiny_model(**overrides).to(dtype)
    assert build_decode_step(model) is None
    params = SamplingParams(max_new_tokens=8, temperature=0)
    want = [c.token_ids for c in Generator(tiny_model(**overrides).to(dtype), BYTE).generate(["hi", "abc"], params)]
    assert [c.token_ids for c in Generator(model, BYTE, exclusive=True).generate(["hi", "abc"], params)] == want
    assert model.decode_step is None
