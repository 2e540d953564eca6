"""The memory model: exact static bytes, activations equal to what autograd saves, and the fit search."""

from __future__ import annotations

import pytest
import torch

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
from tokenmill.model import build_model
from tokenmill.model.config import ModelConfig


def gpt_block(**kw) -> ModelConfig:
    base = dict(
        n_layers=2,
        d_model=64,
        n_heads=4,
        vocab_size=128,
        ffn="mlp",
        ffn_mult=4.0,
        norm="layernorm",
        position="learned",
        bias=True,
    )
    return ModelConfig(**{**base, **kw})


def test_static_bytes_are_params_times_bytes():
    n = 1_241_581_568
    for mode in MODES.values():
        s = static_bytes(n, mode)
        assert s["weights"] == n * 4 and s["gradients"] == n * 4 and s["optimizer"] == n * 8
        assert s["total"] == 16 * n


def test_korthikanti_32h_without_dropout_or_casts():
    # Korthikanti et al. 2022 eq. (1) without dropout masks and with flash attention (no s^2 term): 32 h bytes
    # per token and layer in 16 bit (layernorm, MHA, mlp 4h), plus the small per-token statistics we add
    # (two layernorms x mean and rstd = 16 bytes, fp32 log-sum-exp = 4 per head).
    sixteen_bit = MemoryMode("paper", weight=2, grad=2, activation=2, residual=2, weight_copy=0)
    h, a = 64, 4
    cfg = gpt_block(d_model=h, n_heads=a, attention="sdpa", dropout=0.0)
    assert block_bytes_per_token(cfg, sixteen_bit, 32) == 32 * h + 16 + 4 * a
    # Dropout adds Korthikanti's 2 h of masks.
    assert block_bytes_per_token(gpt_block(d_model=h, n_heads=a, dropout=0.1), sixteen_bit, 32) == 34 * h + 16 + 4 * a


def saved_bytes(model: torch.nn.Module, idx: torch.Tensor, autocast: bool, loss: bool = False) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) autograd saves in a forward of model.hidden (or model.loss of a
    (B, T+1) window), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            is_copy = tuple(t.shape) in weight_shapes or tuple(t.shape)[::-1] in weight_shapes
            seen[storage.data_ptr()] = (storage.nbytes(), is_copy)
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model.loss(idx) if loss else model.hidden(idx)
    return sum(n for n, c in seen.values() if not c), sum(n for n, c in seen.values() if c)


ARCHS = {
    "gpt2": dict(ffn="mlp", norm="layernorm", position="learned", bias=True, activation="gelu_tanh"),
    "llama-gqa": dict(ffn="swiglu", n_kv_heads=2, ffn_hidden=96, norm="rmsnorm", position="rope"),
    "qk-norm": dict(ffn="swiglu", n_kv_heads=2, ffn_hidden=96, norm="rmsnorm", position="rope", qk_norm=True),
    "nobias-headdim": dict(ffn="mlp", activation="gelu", norm="layernorm_nobias", position="rope", head_dim=24),
    "eager-gqa": dict(ffn="swiglu", n_kv_heads=2, ffn_hidden=96, norm="rmsnorm", position="rope", attention="eager"),
}


# Not checkable on CPU, where kernels differ from CUDA: dropout (the CPU kernel keeps float masks) and eager
# attention under autocast (CPU autocast runs softmax in bf16, CUDA in fp32).
CASES = [(arch, mode) for arch in ARCHS for mode in MODES if not (arch.startswith("eager") and mode != "fp32")]


@pytest.mark.parametrize("arch, mode", CASES)
def test_block_bytes_equal_what_autograd_saves(arch, mode):
    # Layers are identical, so the bytes one layer adds = saved(2 layers) - saved(1 layer); exact equality.
    B, T, d = 2, 40, 64  # B x T = 80 never equals a weight dimension, so activations are not taken for copies
    measured = []
    for n_layers in (1, 2):
        cfg = ModelConfig(n_layers=n_layers, d_model=d, n_heads=4, vocab_size=100, max_seq_len=T, **ARCHS[arch])
        torch.manual_seed(0)
        model = build_model(cfg)
        measured.append(saved_bytes(model, torch.randint(0, 100, (B, T)), autocast=mode == "bf16-mixed"))
    added = measured[1][0] - measured[0][0]
    # Per layer, not per token: under autocast the QK-norm weights (2 x head_dim) are cast to bf16 and saved.
    constant = 2 * 2 * cfg.resolved_head_dim() if cfg.qk_norm and mode == "bf16-mixed" else 0
    constant += T * T if cfg.attention == "eager" else 0  # each layer's inverted (T, T) bool causal mask
    assert added == B * T * block_bytes_per_token(cfg, MODES[mode], T) + constant
    # Autocast saves one low-precision copy of every block matmul weight (the head is not in model.hidden);
    # fp32 saves the parameters themselves (no copies).
    head = MODES[mode].weight_copy * 100 * d
    assert measured[1][1] == activation_bytes(cfg, MODES[mode], B, T)["weight_copies"] - head


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
@pytest.mark.parametrize("mode", list(MODES))
def test_whole_loss_forward_matches_estimate(arch, mode):
    # Everything a loss forward saves: blocks, final norm, token ids, fp32 log-probs (the B S V 4 term), weight
    # copies. Within 0.5%: only per-sequence tensors (position ids, RoPE tables) are left out of the estimate.
    B, T = 2, 40
    cfg = ModelConfig(
        n_layers=2, d_model=64, n_heads=4, vocab_size=100, max_seq_len=T, tie_embeddings=False, **ARCHS[arch]
    )
    model = build_model(cfg)
    acts, copies = saved_bytes(model, torch.randint(0, 100, (B, T + 1)), autocast=mode == "bf16-mixed", loss=True)
    est = activation_bytes(cfg, MODES[mode], B, T)
    assert est["logits"] == B * T * 100 * 4
    saved = est["total"] - est["loss_backward"] - est["weight_copies"]  # the backward transient is not saved
    assert abs(acts - saved) <= 0.005 * saved
    assert copies == est["weight_copies"]


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
