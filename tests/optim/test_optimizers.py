"""Optimizers: parameter roles and decay groups, every optimizer trains, state round-trips bitwise, fused AdamW
equals foreach AdamW, bf16 stochastic rounding is unbiased and seeded, Muon orthogonalises, 8-bit needs bnb."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
from torch import nn

from tokenmill.errors import ConfigError, UserError
from tokenmill.optim.adafactor import stochastic_round_to_bf16
from tokenmill.optim.config import OptimConfig
from tokenmill.optim.muon import FallbackMuon, MuonWithAdamW, newton_schulz
from tokenmill.optim.optimizers import OPTIMIZERS, build_optimizer, scaled_lr
from tokenmill.optim.param_groups import build_param_groups, parameter_roles
from tokenmill.parallel.wrappers import canonical_name

VOCAB, DIM = 32, 16


class ScaleNorm(nn.Module):
    """A custom norm (not a torch type) to check norms are found by their class name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


class Tiny(nn.Module):
    """Embedding -> MLP with a residual -> norm -> head; tied or untied head."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.pos_emb = nn.Embedding(8, DIM)
        self.ln = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM, bias=False)
        self.norm = ScaleNorm(DIM)
        self.head = None if tied else nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        x = x + self.down(torch.relu(self.up(self.ln(x))))
        x = self.norm(x)
        return x @ self.tok_emb.weight.T if self.head is None else self.head(x)


def tiny(seed: int = 0, tied: bool = False, dtype: torch.dtype = torch.float32) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(tied).to(dtype)


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (8, 8), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1]).float()
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    x = batch(seed)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


CPU_OPTIMIZERS = ["adamw", "adafactor", "muon"]


# --- parameter roles and decay groups --------------------------------------------------------------------------


def test_roles_of_a_tiny_model():
    assert parameter_roles(tiny()) == {
        "tok_emb.weight": "embedding",
        "pos_emb.weight": "embedding",
        "ln.weight": "norm",
        "ln.bias": "norm",
        "up.weight": "matrix",
        "up.bias": "bias",
        "down.weight": "matrix",
        "norm.gain": "norm",
        "head.weight": "head",
    }


def test_default_decay_groups():
    groups = {g["group"]: g for g in build_param_groups(tiny(), 0.1)}
    assert groups["decay"]["names"] == ["up.weight", "down.weight", "head.weight"]
    assert groups["decay"]["weight_decay"] == 0.1
    assert sorted(groups["no_decay"]["names"]) == sorted(
        ["tok_emb.weight", "pos_emb.weight", "ln.weight", "ln.bias", "up.bias", "norm.gain"]
    )
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_tied_head_is_the_embedding_and_not_decayed():
    model = tiny(tied=True)
    groups = {g["group"]: g["names"] for g in build_param_groups(model, 0.1)}
    assert groups["decay"] == ["up.weight", "down.weight"]
    assert "tok_emb.weight" in groups["no_decay"]
    n_params = sum(len(g["params"]) for g in build_param_groups(model, 0.1))
    assert n_params == len(list(model.parameters()))  # each parameter once


MATRICES = {"up.weight", "down.weight", "head.weight"}
EMBEDDINGS = {"tok_emb.weight", "pos_emb.weight"}
NORMS_BIASES = {"ln.weight", "ln.bias", "up.bias", "norm.gain"}


@pytest.mark.parametrize("embeddings", [False, True])
@pytest.mark.parametrize("norms_biases", [False, True])
def test_decay_switches_pick_exactly_their_tensors(embeddings, norms_biases):
    model = tiny()
    groups = {
        g["group"]: g
        for g in build_param_groups(model, 0.1, decay_embeddings=embeddings, decay_norms_biases=norms_biases)
    }
    expected = MATRICES | (EMBEDDINGS if embeddings else set()) | (NORMS_BIASES if norms_biases else set())
    assert set(groups["decay"]["names"]) == expected
    assert set(groups.get("no_decay", {"names": []})["names"]) == (MATRICES | EMBEDDINGS | NORMS_BIASES) - expected
    tensors = dict(model.named_parameters())
    for group in groups.values():  # the group holds the very tensors it names
        assert [id(p) for p in group["params"]] == [id(tensors[n]) for n in group["names"]]
    assert "no_decay" not in groups or groups["no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "keys, decayed",
    [
        ({}, MATRICES),
        ({"decay_embeddings": True}, MATRICES | EMBEDDINGS),
        ({"decay_norms_biases": True}, MATRICES | NORMS_BIASES),
        ({"decay_norms_biases_embeddings": True}, MATRICES | EMBEDDINGS | NORMS_BIASES),  # the old key still works
    ],
)
@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
def test_every_optimizer_follows_the_decay_keys(keys, decayed, name):
    from tokenmill.optim.config import OptimConfig

    cfg = OptimConfig(name=name, weight_decay=0.1, muon_weight_decay=0.1, **keys)
    opt = OPTIMIZERS[name](tiny(), cfg, cfg.lr, 1.0)
    got = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["names"]}
    assert got == decayed


def test_wrapper_prefixes_are_dropped():
    assert canonical_name("module._orig_mod.blocks.0.attn.q_proj.weight") == "blocks.0.attn.q_proj.weight"

    wrapped = nn.DataParallel(torch.compile(tiny()))  # DDP's naming on CPU; compile wraps lazily: nothing compiled
    assert any(n.startswith("module._orig_mod.") for n, _ in wrapped.named_parameters())
    assert parameter_roles(wrapped) == parameter_roles(tiny())


def test_head_found_by_shape_when_the_model_declares_none():
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB), nn.Linear(VOCAB, VOCAB))
    roles = parameter_roles(model)
    assert roles["1.weight"] == "matrix" and roles["2.weight"] == "head"  # the last Linear to the vocabulary


def test_head_declared_hugging_face_style():
    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, DIM)
            self.proj = nn.Linear(DIM, VOCAB, bias=False)
            self.out = nn.Linear(DIM, VOCAB, bias=False)

        def get_output_embeddings(self) -> nn.Module:
            return self.proj

    roles = parameter_roles(HFLike())
    assert roles["proj.weight"] == "head" and roles["out.weight"] == "matrix"


def test_frozen_parameters_are_left_out():
    model = tiny()
    model.pos_emb.weight.requires_grad_(False)
    names = [n for g in build_param_groups(model, 0.1) for n in g["names"]]
    assert "pos_emb.weight" not in names and "tok_emb.weight" in names


# --- every optimizer trains --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_OPTIMIZERS)
@pytest.mark.parametrize("tied", [False, True])
def test_optimizer_reduces_loss(name, tied):
    model = tiny(tied=tied)
    lr = 0.05 if name == "adafactor" else 1e-2  # Adafactor's lr caps a step relative to the weight's RMS
    opt = build_optimizer(model, OptimConfig(name=name, lr=lr, muon_lr=0.02))
    losses = train(model, opt, 25)
    assert losses[-1] < 0.7 * losses[0], losses


def test_adafactor_bf16_reduces_loss_and_keeps_bf16_params():
    model = tiny(dtype=torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(name="adafactor", lr=0.05))
    losses = train(model, opt, 25)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    state = opt.state[model.up.weight]
    assert state["row_var"].dtype == torch.float32  # the factored second moment is kept in fp32


def test_weight_decay_only_on_decay_group():
    """With zero gradients, AdamW moves only decayed weights (decoupled decay: p *= 1 - lr * wd)."""
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=0.5, weight_decay=0.2))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = model.state_dict()
    torch.testing.assert_close(after["up.weight"], before["up.weight"] * (1 - 0.5 * 0.2))
    torch.testing.assert_close(after["head.weight"], before["head.weight"] * (1 - 0.5 * 0.2))
    for key in ("tok_emb.weight", "ln.weight", "up.bias", "norm.gain"):
        assert torch.equal(after[key], before[key]), key


def test_lr_override_and_scale():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3), lr=4e-3, lr_scale=0.5)
    assert {g["lr"] for g in opt.param_groups} == {2e-3}
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), lr_scale=2.0)
    assert {g["kind"]: g["lr"] for g in opt.param_groups} == {"muon": 0.04, "adamw": 2e-3}


def test_scaled_lr():
    assert scaled_lr(1.4e-5, 16, True) == pytest.approx(5.6e-5)  # seed 004's example: x sqrt(16)
    assert scaled_lr(1.4e-5, 16, False) == 1.4e-5
    with pytest.raises(UserError):
        scaled_lr(1e-3, 0, True)


# --- state round-trip ----------------------------------------------------------------------------------------------


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


ROUNDTRIP_CASES = [
    ("adamw", {"fused": True}, torch.float32),
    ("adamw", {"fused": False}, torch.float32),
    ("adafactor", {}, torch.float32),
    ("adafactor", {}, torch.bfloat16),
    ("muon", {}, torch.float32),
]


@pytest.mark.parametrize("name,options,dtype", ROUNDTRIP_CASES)
def test_state_roundtrip_continues_bitwise(name, options, dtype):
    cfg = OptimConfig(name=name, lr=1e-2, **options)
    straight = tiny(dtype=dtype)
    opt = build_optimizer(straight, cfg)
    train(straight, opt, 6)

    model = tiny(dtype=dtype)
    opt = build_optimizer(model, cfg)
    train(model, opt, 3)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = tiny(seed=7, dtype=dtype)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 3)

    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert type(opt2) is type(opt)


def test_bf16_adafactor_differs_without_its_rounding_state():
    """The rounding generator is part of the state: dropping it changes the continuation (so the test above
    really checks that the random bits are restored)."""
    cfg = OptimConfig(name="adafactor", lr=1e-2)
    straight = tiny(dtype=torch.bfloat16)
    train(straight, build_optimizer(straight, cfg), 6)
    model = tiny(dtype=torch.bfloat16)
    opt = build_optimizer(model, cfg)
    train(model, opt, 3)
    state = _roundtrip(opt.state_dict())
    del state["stochastic_rounding"]
    opt2 = build_optimizer(model, cfg)
    opt2.load_state_dict(state)
    train(model, opt2, 3)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), model.parameters()))


# --- AdamW fused vs foreach -------------------------------------------------------------------------------------


def test_fused_adamw_matches_foreach():
    fused, plain = tiny(), tiny()
    opt_f = build_optimizer(fused, OptimConfig(name="adamw", lr=1e-2, fused=True))
    opt_p = build_optimizer(plain, OptimConfig(name="adamw", lr=1e-2, fused=False))
    assert opt_f.param_groups[0]["fused"] is True  # CPU has a fused AdamW kernel in this torch
    assert not opt_p.param_groups[0]["fused"]
    train(fused, opt_f, 10)
    train(plain, opt_p, 10)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --- bf16 stochastic rounding -------------------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    gap = 2.0**-7  # bf16 spacing in [1, 2)
    for value in (1.0 + 0.3 * gap, -(1.5 + 0.8 * gap), 1e-3 * (1 + 0.55 * 2**-7)):
        x = torch.full((200_000,), value, dtype=torch.float32)
        r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0))
        assert r.dtype == torch.bfloat16
        lo, hi = sorted({float(v) for v in r.float().unique()})  # exactly the two neighbours
        assert lo < value < hi
        mean = r.double().mean().item()
        assert mean == pytest.approx(value, abs=(hi - lo) * 0.005)
        nearest = x.to(torch.bfloat16).double().mean().item()
        assert abs(nearest - value) > (hi - lo) * 0.15  # round-to-nearest is biased here


def test_stochastic_rounding_keeps_representable_values_and_nonfinite():
    x = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf"), float("nan")])
    r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert torch.equal(r[:5], x[:5])
    assert torch.isnan(r[5])


def test_stochastic_rounding_seeds_reproduce():
    x = torch.rand(1000) + 1.0
    a = stochastic_round_to_bf16(x, torch.Generator().manual_seed(3))
    b = stochastic_round_to_bf16(x, torch.Generator().manual_seed(3))
    c = stochastic_round_to_bf16(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_adafactor_seed_config_reproduces():
    def run(seed):
        model = tiny(dtype=torch.bfloat16)
        train(model, build_optimizer(model, OptimConfig(name="adafactor", lr=1e-2, stochastic_rounding_seed=seed)), 3)
        return torch.cat([p.flatten().float() for p in model.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# --- Muon -------------------------------------------------------------------------------------------------------------


def test_newton_schulz_singular_values_near_one():
    torch.manual_seed(0)
    g = torch.randn(32, 64) @ torch.diag(torch.logspace(-2, 1, 64))  # condition number ~1000
    s_in = torch.linalg.svdvals(g)
    assert s_in.max() / s_in.min() > 100
    for m in (g, g.T):  # wide and tall
        s = torch.linalg.svdvals(newton_schulz(m).float())
        assert s.min() > 0.5 and s.max() < 1.5, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o = newton_schulz(g).float()
    cosine = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cosine > 0.9  # close to the polar factor U V^T


def test_muon_groups_by_kind():
    opt = build_optimizer(tiny(), OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1))
    assert isinstance(opt, MuonWithAdamW)
    by_kind: dict[str, list[str]] = {}
    for g in opt.param_groups:
        by_kind.setdefault(g["kind"], []).extend(g["names"])
        assert g["lr"] == (0.02 if g["kind"] == "muon" else 1e-3)
    assert sorted(by_kind["muon"]) == ["down.weight", "up.weight"]  # hidden matrices only
    assert "head.weight" in by_kind["adamw"] and "tok_emb.weight" in by_kind["adamw"]
    decayed = [n for g in opt.param_groups if g["kind"] == "adamw" and g["weight_decay"] > 0 for n in g["names"]]
    assert decayed == ["head.weight"]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_fallback_muon_matches_torch_muon():
    a, b = tiny(), tiny()

    def groups(m):
        return [
            {"params": [m.up.weight, m.down.weight], "kind": "muon", "lr": 0.02, "weight_decay": 0.01},
            {
                "params": [p for n, p in m.named_parameters() if n not in ("up.weight", "down.weight")],
                "kind": "adamw",
                "lr": 1e-2,
            },
        ]

    opt_a = MuonWithAdamW(groups(a), muon_cls=torch.optim.Muon)
    opt_b = MuonWithAdamW(groups(b), muon_cls=FallbackMuon)
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)


def test_muon_rejects_groups_without_kind():
    with pytest.raises(ValueError, match="kind"):
        MuonWithAdamW([{"params": [nn.Parameter(torch.zeros(2, 2))]}])


# --- 8-bit AdamW and bad names -------------------------------------------------------------------------------------


def test_adamw8bit_without_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'tokenmill\[bnb\]'"):
        build_optimizer(tiny(), OptimConfig(name="adamw8bit"))


def test_unknown_optimizer_name():
    with pytest.raises(ConfigError, match="optim.name"):
        OptimConfig(name="adamm").validate()
    with pytest.raises(UserError, match="adamw"):
        build_optimizer(tiny(), OptimConfig(name="adamm"))
    assert set(OPTIMIZERS) == {"adamw", "adafactor", "muon", "adamw8bit"}


def test_bad_optim_values():
    with pytest.raises(ConfigError, match="muon_momentum"):
        OptimConfig(muon_momentum=1.0).validate()
    with pytest.raises(ConfigError, match="muon_weight_decay"):
        OptimConfig(muon_weight_decay=-1.0).validate()


# --- the real model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_roles_and_muon_on_the_transformer(tied):
    from tokenmill.model import ModelConfig, build_model

    cfg = ModelConfig(
        n_layers=1,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        vocab_size=64,
        max_seq_len=16,
        tie_embeddings=tied,
        bias=True,
        position="learned",
        norm="layernorm",
    )
    model = build_model(cfg)
    roles = parameter_roles(model)
    assert roles["tok_emb.weight"] == roles["pos_emb.weight"] == "embedding"
    assert roles["blocks.0.attn.q_proj.weight"] == roles["blocks.0.ffn.down_proj.weight"] == "matrix"
    assert roles["blocks.0.attn.q_proj.bias"] == "bias"
    assert roles["blocks.0.attn_norm.weight"] == roles["blocks.0.attn_norm.bias"] == roles["norm.weight"] == "norm"
    assert ("head.weight" in roles) == (not tied)
    if not tied:
        assert roles["head.weight"] == "head"
    opt = build_optimizer(model, OptimConfig(name="muon"))
    muon = {n for g in opt.param_groups if g["kind"] == "muon" for n in g["names"]}
    assert muon == {n for n, r in roles.items() if r == "matrix"}
    assert opt.param_groups[0]["kind"] == "adamw"  # lr[0] reported by schedulers is optim.lr's
    x = torch.randint(0, 64, (2, 9))
    first = model.loss(x).item()
    for _ in range(5):
        model.loss(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert model.loss(x).item() < first
