"""The decoder on tiny CPU models: every component combination runs forward and backward, state-dict keys follow
the contract, init follows its table, dropout behaves, meta builds allocate nothing, last_only is exact."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from tokenmill.errors import ConfigError, UserError
from tokenmill.model import Transformer, build_meta, build_model
from tokenmill.model.config import ModelConfig
from tokenmill.model.ffn import ACTIVATIONS, FFNS
from tokenmill.model.init import deepnet_alpha, deepnet_beta
from tokenmill.model.norms import NORMS
from tokenmill.model.position import POSITIONS, apply_rope, positions_from_doc_ids
from tokenmill.model.transformer import NORM_POSITIONS

V = 64


def tiny(**overrides) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=16, ffn_hidden=48)
    cfg = ModelConfig(**{**base, **overrides})
    cfg.validate()
    return cfg


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides))


def tokens(B: int = 2, T: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


COMBOS = list(itertools.product(sorted(NORMS), sorted(POSITIONS), sorted(FFNS), sorted(NORM_POSITIONS), [True, False]))


@pytest.mark.parametrize("norm,position,ffn,norm_position,tied", COMBOS)
def test_forward_backward_every_combination(norm, position, ffn, norm_position, tied):
    model = make(norm=norm, position=position, ffn=ffn, norm_position=norm_position, tie_embeddings=tied)
    window = tokens()
    logits = model(window[:, :-1])
    assert logits.shape == (2, 8, V)
    loss = model.loss(window)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # every matrix gets a non-zero gradient (a component silently left out of the graph would not)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert p.grad.abs().sum() > 0, name
    assert (model.head is None) == tied
    assert (model.pos_emb is not None) == (position == "learned")
    assert (model.rope is not None) == (position == "rope")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activations(activation):
    model = make(ffn="mlp", activation=activation)
    model.loss(tokens()).backward()
    assert model.blocks[0].ffn.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_kv_heads", [0, 1, 2, 4])
def test_gqa_and_mha(n_kv_heads):
    model = make(n_kv_heads=n_kv_heads)
    kv = n_kv_heads or 4
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (kv * 8, 32)
    assert attn.v_proj.weight.shape == (kv * 8, 32)
    assert attn.q_proj.weight.shape == (4 * 8, 32)
    model.loss(tokens()).backward()
    assert attn.k_proj.weight.grad.abs().sum() > 0


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with kv heads copied into every group is exactly MHA: checks which query heads share a kv head."""
    gqa = make(n_kv_heads=2)
    mha = make(n_kv_heads=4)
    state = gqa.state_dict()
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            w = state[f"blocks.{i}.attn.{proj}.weight"].view(2, 8, 32)  # (kv, hd, d)
            state[f"blocks.{i}.attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=1e-5)


def test_head_dim_explicit():
    model = make(head_dim=16)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (4 * 16, 32)
    assert attn.o_proj.weight.shape == (32, 4 * 16)
    model.loss(tokens()).backward()


def test_state_dict_keys_llama_like():
    model = make(qk_norm=True, tie_embeddings=False)
    keys = set(model.state_dict())
    expected = {"tok_emb.weight", "norm.weight", "head.weight"}
    for i in range(2):
        p = f"blocks.{i}."
        expected |= {p + "attn_norm.weight", p + "ffn_norm.weight", p + "attn.q_norm.weight", p + "attn.k_norm.weight"}
        expected |= {f"{p}attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {f"{p}ffn.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    assert keys == expected


def test_state_dict_keys_gpt2_like():
    model = make(norm="layernorm", position="learned", ffn="mlp", activation="gelu_tanh", bias=True, n_kv_heads=0)
    keys = set(model.state_dict())
    expected = {"tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias"}
    for i in range(2):
        p = f"blocks.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            expected |= {f"{p}{norm}.weight", f"{p}{norm}.bias"}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected |= {f"{p}attn.{n}.weight", f"{p}attn.{n}.bias"}
        for n in ("up_proj", "down_proj"):
            expected |= {f"{p}ffn.{n}.weight", f"{p}ffn.{n}.bias"}
    assert keys == expected  # tied: no head.weight; rope cache is not persistent


@pytest.mark.parametrize("bias", [True, False])
def test_bias_on_off(bias):
    model = make(bias=bias, norm="rmsnorm")
    linear_biases = [n for n, _ in model.named_parameters() if n.endswith("_proj.bias")]
    assert bool(linear_biases) == bias
    if bias:
        assert len(linear_biases) == 2 * (4 + 3)
        model.loss(tokens()).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("_proj.bias"))


def test_qk_norm_changes_outputs_and_normalises_heads():
    plain, normed = make(qk_norm=False), make(qk_norm=True)
    x = tokens()
    assert not torch.allclose(plain(x), normed(x))
    # with unit weights, each normalised head vector has RMS 1
    attn = normed.blocks[0].attn
    q = attn.q_proj(100 * torch.randn(1, 3, 32)).view(1, 3, 4, 8)  # large enough that eps is negligible
    rms = attn.q_norm(q).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)


def test_dropout_zero_is_deterministic_in_train_mode():
    model = make(dropout=0.0).train()
    x = tokens()
    assert torch.equal(model(x), model(x))


def test_dropout_positive_differs_in_train_mode_only():
    model = make(dropout=0.3).train()
    x = tokens()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_last_only_equals_last_row_of_full_logits():
    for overrides in ({}, {"tie_embeddings": False}, {"position": "learned"}):
        model = make(**overrides)
        x = tokens(T=11)
        full = model(x)
        last = model(x, last_only=True)
        assert last.shape == (2, 1, V)
        torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


def test_last_only_runs_the_head_on_one_position(monkeypatch):
    model = make()
    seen = []
    original = torch.nn.functional.linear

    def spy(x, w, b=None):
        if w is model.tok_emb.weight:
            seen.append(tuple(x.shape))
        return original(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    model(tokens(T=11), last_only=True)
    assert seen == [(2, 1, 32)]


def test_meta_build_has_no_storage():
    model = build_meta(tiny(n_layers=4, d_model=512, n_heads=8, vocab_size=50_000))
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_build_model_materialises_everything():
    model = make()
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        assert not t.is_meta, name
        assert torch.isfinite(t).all(), name
    torch.testing.assert_close(model.rope.cos[0], torch.ones(4))  # position 0: no rotation


def test_init_is_reproducible():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for (name, pa), pb, _pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def _std(t: torch.Tensor) -> float:
    return t.float().std().item()


def test_normal_init_table():
    model = make(
        n_layers=8,
        d_model=256,
        n_heads=4,
        n_kv_heads=0,
        ffn_hidden=1024,
        bias=True,
        norm="layernorm",
        tie_embeddings=False,
        vocab_size=1024,
        init="normal",
        init_std=0.02,
    )
    block = model.blocks[3]
    residual = 0.02 / math.sqrt(2 * 8)
    for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.ffn.gate_proj, block.ffn.up_proj):
        assert _std(proj.weight) == pytest.approx(0.02, rel=0.05)
    for proj in (block.attn.o_proj, block.ffn.down_proj):
        assert _std(proj.weight) == pytest.approx(residual, rel=0.05)
    assert _std(model.tok_emb.weight) == pytest.approx(0.02, rel=0.05)
    assert _std(model.head.weight) == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.q_proj.bias == 0)
    assert torch.all(block.attn_norm.weight == 1) and torch.all(block.attn_norm.bias == 0)
    assert block.residual_alpha == 1.0


def test_fan_in_init_table():
    model = make(
        n_layers=8,
        d_model=256,
        n_heads=4,
        n_kv_heads=0,
        ffn_hidden=1024,
        tie_embeddings=False,
        vocab_size=1024,
        init="fan_in",
    )
    block = model.blocks[0]
    assert _std(block.attn.q_proj.weight) == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert _std(block.ffn.up_proj.weight) == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert _std(block.attn.o_proj.weight) == pytest.approx(1 / math.sqrt(256) / 4, rel=0.05)
    assert _std(block.ffn.down_proj.weight) == pytest.approx(1 / math.sqrt(1024) / 4, rel=0.05)
    assert _std(model.head.weight) == pytest.approx(1 / math.sqrt(256), rel=0.05)


def test_deepnet_init_and_residual_scale():
    L = 8
    model = make(
        n_layers=L,
        d_model=256,
        n_heads=4,
        n_kv_heads=0,
        ffn_hidden=1024,
        vocab_size=1024,
        init="deepnet",
        norm_position="post",
    )
    alpha, beta = (2 * L) ** 0.25, (8 * L) ** -0.25
    assert deepnet_alpha(L) == pytest.approx(alpha) and deepnet_beta(L) == pytest.approx(beta)
    block = model.blocks[5]
    assert block.residual_alpha == pytest.approx(alpha)
    xavier_square = math.sqrt(2 / (256 + 256))
    xavier_ffn = math.sqrt(2 / (256 + 1024))
    assert _std(block.attn.q_proj.weight) == pytest.approx(xavier_square, rel=0.05)
    assert _std(block.attn.k_proj.weight) == pytest.approx(xavier_square, rel=0.05)
    assert _std(block.attn.v_proj.weight) == pytest.approx(beta * xavier_square, rel=0.05)
    assert _std(block.attn.o_proj.weight) == pytest.approx(beta * xavier_square, rel=0.05)
    for proj in (block.ffn.gate_proj, block.ffn.up_proj, block.ffn.down_proj):
        assert _std(proj.weight) == pytest.approx(beta * xavier_ffn, rel=0.05)
    assert isinstance(model.norm, torch.nn.Identity)  # post-norm blocks end normalised


def test_post_norm_block_applies_alpha_before_the_norm():
    model = make(init="deepnet", norm_position="post", dropout=0.0)
    block = model.blocks[0]
    x = torch.randn(1, 5, 32)
    from tokenmill.model.transformer import BlockContext

    ctx = BlockContext(rope=model.rope.tables(torch.arange(5)), mask=model.backend.prepare(None, 5, x.device))
    a = block.residual_alpha
    h = block.attn_norm(a * x + block.attn(x, ctx.rope, ctx.mask))
    expected = block.ffn_norm(a * h + block.ffn(h))
    torch.testing.assert_close(block(x, ctx), expected)


def test_deepnet_requires_post_norm():
    with pytest.raises(ConfigError, match="norm_position=post"):
        tiny(init="deepnet", norm_position="pre")


def test_flex_refuses_dropout():
    with pytest.raises(ConfigError, match="model.dropout"):
        tiny(attention="flex", dropout=0.1)


def test_flash_attn_missing_is_a_user_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="flash-attn"):
            build_model(tiny(attention="flash_attn"))
    else:
        pytest.skip("flash-attn is installed")


def test_sequence_longer_than_max_seq_len_is_refused():
    model = make()
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_unknown_component_names_are_config_errors():
    for key in ("norm", "position", "ffn", "attention", "activation", "init", "norm_position"):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            tiny(**{key: "nope"})


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert torch.equal(positions_from_doc_ids(doc_ids), expected)


def test_rope_matches_complex_rotation_and_is_relative():
    model = make()
    rope = model.rope
    hd = 8
    # rotate-half layout: pair (i, i + hd/2) is one complex number, rotated by position * theta^(-2i/hd)
    x = torch.randn(1, 6, 1, hd)
    pos = torch.arange(6)
    out = apply_rope(x, *rope.tables(pos))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    z = (
        torch.complex(x[..., : hd // 2], x[..., hd // 2 :])
        * torch.polar(torch.ones(6, hd // 2), pos[:, None] * inv_freq)[None, :, None]
    )
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1), atol=1e-5, rtol=1e-5)
    # q.k after rotation depends only on the position difference
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq: int, pk: int) -> torch.Tensor:
        rq = apply_rope(q, *rope.tables(torch.tensor([pq])))
        rk = apply_rope(k, *rope.tables(torch.tensor([pk])))
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rope_theta_is_used():
    a, b = make(rope_theta=10000.0), make(rope_theta=500000.0)
    assert not torch.allclose(a.rope.cos, b.rope.cos)
    x = tokens()
    assert not torch.allclose(a(x), b(x))


def test_config_round_trip_keeps_the_model():
    cfg = tiny(qk_norm=True)
    again = ModelConfig(**dataclasses.asdict(cfg))
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(again)
    x = tokens()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_keeps_the_input_dtype_with_fp32_weights(dtype):
    """flash-attn (not autocast-aware) needs q/k in bf16 after QK-norm even with fp32 master weights."""
    norm = make(qk_norm=True).blocks[0].attn.q_norm
    assert norm.weight.dtype == torch.float32
    x = torch.randn(2, 3, 4, 8)
    out = norm(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), norm(x), atol=2e-2, rtol=2e-2)
