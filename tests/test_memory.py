"""The memory model: exact static bytes, Korthikanti's per-layer activation count, and the fit search."""

from __future__ import annotations

import pytest

from tokenmill.metrics.memory import (
    GIB,
    MODES,
    MemoryMode,
    activation_bytes,
    block_bytes_per_token,
    max_micro_batch,
    static_bytes,
    usable_bytes,
)
from tokenmill.model.config import ModelConfig


def gpt_block(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=128, ffn="mlp", ffn_mult=4.0, norm="layernorm",
                position="learned", bias=True)
    return ModelConfig(**{**base, **kw})


def test_static_bytes_are_params_times_bytes():
    n = 1_241_581_568
    for mode in MODES.values():
        s = static_bytes(n, mode)
        assert s["weights"] == n * 4 and s["gradients"] == n * 4 and s["optimizer"] == n * 8
        assert s["total"] == 16 * n


def test_korthikanti_34_plus_5as_over_h():
    # Korthikanti et al. 2022 eq. (1): 16-bit activations, stored materialised scores, dropout everywhere,
    # residual in 16 bit too: s b h (34 + 5 a s / h) bytes per layer, i.e. 34 h + 5 a s per token.
    sixteen_bit = MemoryMode("paper", weight=2, grad=2, activation=2, residual=2, weight_copy=0)
    h, a, s = 64, 4, 32
    cfg = gpt_block(d_model=h, n_heads=a, attention="eager", dropout=0.1)
    assert block_bytes_per_token(cfg, sixteen_bit, s) == 34 * h + 5 * a * s
    # Flash-style attention keeps no s^2 scores and without dropout there are no masks: 32 h.
    cfg = gpt_block(d_model=h, n_heads=a, attention="sdpa", dropout=0.0)
    assert block_bytes_per_token(cfg, sixteen_bit, s) == 32 * h


def test_block_bytes_gqa_swiglu_qk_norm_under_autocast():
    mode = MODES["bf16-mixed"]  # A = 2, R = 4
    d, hd, nq, nkv, f = 64, 16, 4, 2, 96
    cfg = ModelConfig(n_layers=1, d_model=d, n_heads=nq, n_kv_heads=nkv, ffn="swiglu", ffn_hidden=f,
                      vocab_size=50, qk_norm=True)
    q, kv = nq * hd, nkv * hd
    attn = 4 * d + 2 * d + 2 * (q + 2 * kv) + 2 * q + 2 * (q + kv)
    ffn = 4 * d + 2 * d + 4 * 2 * f
    assert block_bytes_per_token(cfg, mode, seq_len=128) == attn + ffn


def test_activation_totals_and_checkpointing():
    cfg = gpt_block(n_layers=3, vocab_size=100)
    mode = MODES["bf16-mixed"]
    b, s = 2, 16
    full = activation_bytes(cfg, mode, b, s)
    per_block = block_bytes_per_token(cfg, mode, s)
    assert full["blocks"] == b * s * 3 * per_block
    assert full["logits"] == b * s * 100 * 4  # B S V x 4 bytes
    assert full["loss_backward"] == 2 * full["logits"]
    ac = activation_bytes(cfg, mode, b, s, checkpointing=True)
    assert ac["blocks"] == b * s * (3 * 4 * 64 + per_block)  # block inputs (fp32) + one block recomputed
    assert ac["total"] < full["total"]
    chunked = activation_bytes(cfg, mode, b, s, loss_chunk_size=8)
    assert chunked["logits"] == 8 * 100 * 4
    # fp32 mode keeps no autocast weight copies.
    assert activation_bytes(cfg, MODES["fp32"], b, s)["weight_copies"] == 0


def test_max_micro_batch_is_the_largest_that_fits():
    cfg = ModelConfig(n_layers=4, d_model=256, n_heads=4, vocab_size=4096)
    mode = MODES["bf16-mixed"]
    n_params, s, gib = 5_000_000, 256, 2.0
    b = max_micro_batch(cfg, mode, n_params, s, gib)
    budget = usable_bytes(gib) - static_bytes(n_params, mode)["total"]
    assert b >= 1
    assert activation_bytes(cfg, mode, b, s)["total"] <= budget < activation_bytes(cfg, mode, b + 1, s)["total"]
    assert max_micro_batch(cfg, mode, n_params, s, gib, checkpointing=True) > b
    # A model whose static state alone exceeds the card does not fit at all.
    assert max_micro_batch(cfg, mode, 10**9, s, gib) == 0


def test_usable_bytes_margin():
    assert usable_bytes(80) == int(79 * 0.9 * GIB)
    assert usable_bytes(80) < 80 * GIB


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_keep_fp32_master_weights(mode):
    assert MODES[mode].weight == 4 and MODES[mode].grad == 4
