"""Building, caching and guarding the compiled decode step (generation/native_step.py); its logits are compared with
the model's in test_decode_step.py."""

from __future__ import annotations

import logging

import pytest
import torch
from gen_helpers import V, tiny_model

from tokenmill.generation.decode_step import FusedDecodeStep, build_decode_step
from tokenmill.generation.native_step import NativeDecodeStep, compile_kernel, load_kernel
from tokenmill.model.kv_cache import KVCache


@pytest.fixture
def kernel():
    if load_kernel() is None:
        pytest.skip("no C compiler")
    return load_kernel()


def test_the_kernel_compiles_once_into_the_cache_folder(tmp_path, kernel):
    first = compile_kernel(tmp_path / "kernels", "cc")
    assert first is not None and first.parent == tmp_path / "kernels" and first.suffix == ".so"
    built_at = first.stat().st_mtime_ns
    assert compile_kernel(tmp_path / "kernels", "cc") == first  # found, not rebuilt
    assert first.stat().st_mtime_ns == built_at
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # no build folder left behind


def test_without_a_compiler_there_is_no_kernel_and_a_warning_says_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenmill.generation"):
        assert compile_kernel(tmp_path / "kernels", str(tmp_path / "no-such-cc")) is None
    assert "did not compile" in caplog.text and "no-such-cc" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_the_environment_can_ask_for_the_python_step(monkeypatch, kernel):
    assert isinstance(build_decode_step(tiny_model()), NativeDecodeStep)
    monkeypatch.setenv("TOKENMILL_NATIVE_DECODE", "0")
    assert type(build_decode_step(tiny_model())) is FusedDecodeStep


@pytest.mark.parametrize(
    ("tokens", "positions", "message"),
    [([V], [3], "token ids"), ([-1], [3], "token ids"), ([5], [16], "positions"), ([5, 6, 7], [1, 1, 1], "rows")],
    ids=["token-past-vocab", "negative-token", "position-past-cache", "more-rows-than-cache"],
)
def test_out_of_range_input_is_refused_before_the_kernel_touches_memory(kernel, tokens, positions, message):
    model = tiny_model()
    step = build_decode_step(model)
    cache = KVCache.allocate(model.cfg, 2, 16, "cpu", torch.float32)
    with pytest.raises((IndexError, ValueError), match=message):
        step(tokens, positions, cache)
    assert all(not t.any() for t in cache.keys + cache.values)  # nothing written


def test_a_cache_it_cannot_read_is_refused_and_leaves_the_step_on_its_own_cache(kernel):
    model = tiny_model()
    step = build_decode_step(model)
    cfg = model.cfg
    cache = KVCache.allocate(cfg, 1, 16, "cpu", torch.float32)
    step([5], [0], cache)
    good = (1, cfg.kv_heads(), 16, cfg.resolved_head_dim())
    # in its own memory; only the last layer's values have (slot, head_dim) not contiguous
    strided = KVCache(
        [torch.zeros(good) for _ in range(cfg.n_layers)],
        [torch.zeros(good) for _ in range(cfg.n_layers - 1)]
        + [torch.zeros(good).transpose(2, 3).contiguous().transpose(2, 3)],
    )
    with pytest.raises(ValueError, match="contiguous"):
        step([5], [1], strided)
    step([6], [1], cache)  # the cache it was bound to before the refusal
    assert all(t[0, :, 1].any() for t in cache.keys + cache.values)
    assert all(not t.any() for t in strided.keys + strided.values)


def test_a_position_past_the_context_is_refused_even_in_a_longer_cache(kernel):
    model = tiny_model()
    step = build_decode_step(model)
    cfg = model.cfg
    shape = (1, cfg.kv_heads(), cfg.max_seq_len + 8, cfg.resolved_head_dim())  # more slots than positions exist
    cache = KVCache(
        [torch.zeros(shape) for _ in range(cfg.n_layers)], [torch.zeros(shape) for _ in range(cfg.n_layers)]
    )
    with pytest.raises(IndexError, match="positions"):
        step([5], [cfg.max_seq_len], cache)
    assert step([5], [cfg.max_seq_len - 1], cache).shape == (1, V)
