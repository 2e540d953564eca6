"""The recipe's optimizer options: per-role learning rates, width scaling, warmup in tokens, the default
recipe itself (Muon + AdamW, trapezoid schedule) and the banner's description of it."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import load_config
from tokenmill.errors import ConfigError
from tokenmill.model import build_model
from tokenmill.model.config import ModelConfig
from tokenmill.optim.config import OptimConfig, ScheduleConfig
from tokenmill.optim.optimizers import build_optimizer
from tokenmill.optim.recipe import describe_groups, describe_schedule
from tokenmill.optim.schedules import build_scheduler
from tokenmill.parallel.wrappers import canonical_name


def model(tied: bool = False, d_model: int = 32):
    cfg = ModelConfig(n_layers=2, d_model=d_model, n_heads=4, vocab_size=64, max_seq_len=16, tie_embeddings=tied)
    torch.manual_seed(0)
    return build_model(cfg)


def lr_by_name(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {canonical_name(n): g["lr"] for g in opt.param_groups for n in g["names"]}


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_each_role_gets_its_own_lr(name):
    cfg = OptimConfig(name=name, lr=1e-3, muon_lr=0.02, embedding_lr=5e-3, head_lr=2e-3, scalar_lr=4e-3)
    lrs = lr_by_name(build_optimizer(model(), cfg))
    assert lrs["tok_emb.weight"] == 5e-3 and lrs["head.weight"] == 2e-3
    assert lrs["norm.weight"] == 4e-3 and lrs["blocks.0.attn_norm.weight"] == 4e-3
    assert lrs["blocks.0.attn.q_proj.weight"] == (0.02 if name == "muon" else 1e-3)


def test_default_lrs_keep_one_group_per_kind_and_decay():
    opt = build_optimizer(model(), OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    assert [(g["kind"], g["group"], g["lr"]) for g in opt.param_groups] == [
        ("adamw", "decay", 1e-3),  # the untied head
        ("adamw", "no_decay", 1e-3),  # embedding, norms
        ("muon", "decay", 0.02),
    ]


def test_lr_reference_width_scales_adam_matrices_and_head_not_embeddings():
    cfg = OptimConfig(name="adamw", lr=1e-3, lr_reference_width=16)
    lrs = lr_by_name(build_optimizer(model(d_model=64), cfg))
    assert lrs["blocks.0.ffn.up_proj.weight"] == pytest.approx(1e-3 / 4)
    assert lrs["head.weight"] == pytest.approx(1e-3 / 4)
    assert lrs["tok_emb.weight"] == 1e-3 and lrs["norm.weight"] == 1e-3
    muon = lr_by_name(build_optimizer(model(d_model=64), OptimConfig(name="muon", muon_lr=0.02, lr_reference_width=16)))
    assert muon["blocks.0.ffn.up_proj.weight"] == 0.02  # Muon matrices are not width-scaled


def test_role_lrs_follow_the_schedule_and_survive_resume():
    cfg = OptimConfig(name="muon", lr=1e-3, embedding_lr=5e-3)
    sched_cfg = ScheduleConfig(name="wsd-linear", warmup_steps=2)
    opt = build_optimizer(model(), cfg)
    sched = build_scheduler(opt, sched_cfg, 10, 64)
    for _ in range(3):
        opt.step()
        sched.step()
    fresh = build_optimizer(model(), cfg)
    fresh_sched = build_scheduler(fresh, sched_cfg, 10, 64)
    fresh.load_state_dict(opt.state_dict())
    fresh_sched.load_state_dict(sched.state_dict())
    assert lr_by_name(fresh) == lr_by_name(opt)
    assert lr_by_name(opt)["tok_emb.weight"] == pytest.approx(5e-3)  # step 3: past the 2-step warmup


def test_warmup_tokens_replaces_warmup_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = ScheduleConfig(name="constant", warmup_steps=100, warmup_tokens=5000)
    sched = build_scheduler(opt, cfg, 50, 2048)  # ceil(5000 / 2048) = 3 warmup steps
    assert [sched.multiplier(s) for s in range(4)] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0])
    with pytest.raises(ConfigError, match="schedule.warmup_tokens"):
        load_config(["tiny"], overrides=["schedule.warmup_tokens=-1"])


def test_wsd_linear_is_a_trapezoid():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name="wsd-linear", warmup_steps=2, decay_ratio=0.5), 10, 1)
    assert [round(sched.multiplier(s), 3) for s in range(11)] == [
        0.333,
        0.667,
        1.0,
        1.0,
        1.0,
        1.0,
        0.82,
        0.64,
        0.46,
        0.28,
        0.1,
    ]


def test_presets_inherit_the_recipe():
    for preset in ("tiny", "demo", "gpt2-124m", "pt-small"):
        cfg = load_config([preset])
        assert (cfg.optim.name, cfg.schedule.name) == ("muon", "wsd-linear"), preset


def test_description_names_groups_and_schedule():
    groups = describe_groups(OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, head_lr=1e-3), 256, tied=False)
    assert groups == "Muon 0.02: matrices | AdamW 0.001: head | AdamW 0.003: embeddings, norms, biases"
    tied = describe_groups(OptimConfig(name="adamw", lr=3e-3), 256, tied=True)
    assert tied == "AdamW 0.003: matrices, embeddings, norms, biases"
    schedule = describe_schedule(ScheduleConfig(name="wsd-linear", warmup_tokens=204800), 1000, 2048)
    assert schedule == "wsd-linear: warmup 100 steps, peak to step 800, then linearly to 0.1x at 1000"
