"""LR schedules: values at the phase boundaries computed by hand, the infinite schedule's phases and cooldown rule,
and exact resume of the scheduler."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tokenmill.errors import ConfigError, UserError
from tokenmill.optim.config import ScheduleConfig
from tokenmill.optim.schedules import SCHEDULES, build_scheduler, infinite_cooldown_steps


def lr_at(name: str, step: int, total: int = 110, warmup: int = 10, tokens_per_step: int = 100, **cfg) -> float:
    return SCHEDULES[name](step, total, warmup, ScheduleConfig(name=name, **cfg), tokens_per_step)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_warmup_is_linear_and_reaches_the_peak(name):
    assert lr_at(name, 0, min_lr_ratio=0.1) == pytest.approx(1 / 11)
    assert lr_at(name, 4, min_lr_ratio=0.1) == pytest.approx(5 / 11)
    assert lr_at(name, 10, min_lr_ratio=0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_no_warmup_starts_at_the_peak(name):
    assert lr_at(name, 0, warmup=0) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_multiplier_stays_in_unit_interval(name):
    values = [lr_at(name, s, total=200, warmup=20, min_lr_ratio=0.05, anneal_steps=30) for s in range(260)]
    assert all(0.0 <= v <= 1.0 for v in values)


def test_cosine_mid_decay_and_final():
    # decay runs from step 10 (progress 0) to step 110 (progress 1)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))  # = 0.86820...
    assert lr_at("cosine", 35, min_lr_ratio=0.1) == pytest.approx(quarter)
    assert lr_at("cosine", 60, min_lr_ratio=0.1) == pytest.approx(0.55)
    last = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.99))
    assert lr_at("cosine", 109, min_lr_ratio=0.1) == pytest.approx(last)
    assert lr_at("cosine", 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at("cosine", 500, min_lr_ratio=0.1) == pytest.approx(0.1)  # past the end: stays at the floor


def test_linear_mid_decay_and_final():
    assert lr_at("linear", 60, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at("linear", 85, min_lr_ratio=0.1) == pytest.approx(1 - 0.9 * 0.75)
    assert lr_at("linear", 110, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_constant_after_warmup():
    assert lr_at("constant", 11) == 1.0
    assert lr_at("constant", 10_000) == 1.0


def test_wsd_stable_then_one_minus_sqrt_decay():
    kw = dict(total=100, min_lr_ratio=0.1, decay_ratio=0.2)  # decay over steps 80..100
    assert lr_at("wsd", 50, **kw) == 1.0
    assert lr_at("wsd", 80, **kw) == pytest.approx(1.0)
    assert lr_at("wsd", 90, **kw) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr_at("wsd", 95, **kw) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.75)))
    assert lr_at("wsd", 100, **kw) == pytest.approx(0.1)


def test_wsd_linear_decay():
    kw = dict(total=100, min_lr_ratio=0.1, decay_ratio=0.2)
    assert lr_at("wsd-linear", 79, **kw) == 1.0
    assert lr_at("wsd-linear", 90, **kw) == pytest.approx(0.55)
    assert lr_at("wsd-linear", 100, **kw) == pytest.approx(0.1)


# Infinite schedule: warmup 10, total 1000 steps, 100 tokens per step, constant 0.5, floor 0.1.
INF = dict(total=1000, warmup=10, tokens_per_step=100, constant_lr_ratio=0.5, min_lr_ratio=0.1)


def test_infinite_cooldown_length_ratio_wins():
    cfg = ScheduleConfig(name="infinite", min_cooldown_tokens=10_000)  # 100 steps < 0.7 x 1000
    assert infinite_cooldown_steps(1000, cfg, 100) == pytest.approx(700)


def test_infinite_cooldown_length_min_tokens_wins():
    cfg = ScheduleConfig(name="infinite", min_cooldown_tokens=10_000_000)  # 100,000 steps > 700
    assert infinite_cooldown_steps(1000, cfg, 100) == pytest.approx(100_000)


def test_infinite_phases_when_ratio_wins():
    kw = dict(INF, min_cooldown_tokens=10_000)  # cooldown = 700 steps: 10..710
    assert lr_at("infinite", 5, **kw) == pytest.approx(6 / 11)  # warmup
    assert lr_at("infinite", 10, **kw) == pytest.approx(1.0)  # cooldown starts at the peak
    assert lr_at("infinite", 360, **kw) == pytest.approx(0.75)  # half-way through the cosine: (1 + 0.5) / 2
    assert lr_at("infinite", 185, **kw) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at("infinite", 710, **kw) == pytest.approx(0.5)  # constant phase
    assert lr_at("infinite", 1000, **kw) == pytest.approx(0.5)  # no anneal configured: stays constant
    assert lr_at("infinite", 5000, **kw) == pytest.approx(0.5)  # "infinite": the run can go on


def test_infinite_anneal_phase():
    kw = dict(INF, min_cooldown_tokens=10_000, anneal_steps=100)  # anneal 900..1000 from 0.5 to 0.1
    assert lr_at("infinite", 899, **kw) == pytest.approx(0.5)
    assert lr_at("infinite", 900, **kw) == pytest.approx(0.5)
    assert lr_at("infinite", 950, **kw) == pytest.approx(0.3)
    assert lr_at("infinite", 1000, **kw) == pytest.approx(0.1)


def test_infinite_lr_stays_high_when_cooldown_outlasts_the_run():
    kw = dict(INF, min_cooldown_tokens=10_000_000)  # cooldown 100,000 steps, run 1000
    end = lr_at("infinite", 1000, **kw)
    assert end == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 990 / 100_000)))
    assert end > 0.999


def test_infinite_anneal_during_cooldown_starts_from_the_current_lr():
    kw = dict(INF, min_cooldown_tokens=10_000_000, anneal_steps=100)
    high = 0.5 + 0.25 * (1 + math.cos(math.pi * 890 / 100_000))  # cooldown value at step 900
    assert lr_at("infinite", 900, **kw) == pytest.approx(high)
    assert lr_at("infinite", 950, **kw) == pytest.approx((high + 0.1) / 2)
    assert lr_at("infinite", 1000, **kw) == pytest.approx(0.1)


def test_infinite_needs_tokens_per_step():
    with pytest.raises(UserError, match="tokens_per_step"):
        lr_at("infinite", 20, tokens_per_step=0)


def _optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": 0.02}, {"params": [b], "lr": 0.003}])


def test_scheduler_respects_per_group_base_lrs():
    opt = _optimizer()
    sched = build_scheduler(opt, ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), 20, 64)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 / 5, 0.003 / 5])  # step 0
    for _ in range(4):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.003])  # warmup end
    for _ in range(16):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.0003])  # final step
    assert sched.get_last_lr() == pytest.approx([0.002, 0.0003])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_scheduler_resumes_exactly(name):
    cfg = ScheduleConfig(name=name, warmup_steps=3, min_lr_ratio=0.1, min_cooldown_tokens=640, anneal_steps=5)

    def run(opt, sched, n):
        lrs = []
        for _ in range(n):
            opt.step()
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        return lrs

    opt = _optimizer()
    straight = run(opt, build_scheduler(opt, cfg, 30, 64), 30)

    opt = _optimizer()
    sched = build_scheduler(opt, cfg, 30, 64)
    first = run(opt, sched, 12)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2 = _optimizer()
    sched2 = build_scheduler(opt2, cfg, 30, 64)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert first + run(opt2, sched2, 18) == straight  # bitwise: same floats


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(UserError, match="schedule.name"):
        build_scheduler(_optimizer(), ScheduleConfig(name="cosnie"), 10, 64)
    with pytest.raises(ConfigError, match="schedule.name"):
        ScheduleConfig(name="cosnie").validate()
    with pytest.raises(UserError, match="total_steps"):
        build_scheduler(_optimizer(), ScheduleConfig(), 0, 64)
