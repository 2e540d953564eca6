"""StepMonitor: every O2 field per log step, pre-clip gradient statistics, per-layer norms and update ratios,
throughput / MFU arithmetic, paused time, and the progress bar."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

from tokenmill.config import load_config
from tokenmill.metrics import monitor as monitor_mod
from tokenmill.metrics.monitor import STEP_METRICS, StepMonitor, group_of
from tokenmill.metrics.sinks import JsonlSink, MultiSink, read_jsonl
from tokenmill.model import build_model
from tokenmill.train.batching import plan_batches
from tokenmill.train.cadence import build_cadence

SMALL = [
    "model.vocab_size=64",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.max_seq_len=16",
    "train.seq_len=16",
    "train.micro_batch_size=2",
    "log.progress_bar=false",
]


def setup(*overrides: str, steps: int = 4):
    cfg = load_config(["tiny"], overrides=[*SMALL, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    plan = plan_batches(2, 16, 1, 0, 0, steps, 1000)
    return cfg, model, plan


def monitor_for(cfg, plan, **kwargs) -> StepMonitor:
    """A StepMonitor on the loop's cadence for this config (a 1000-parameter model: per-layer stats on auto)."""
    return StepMonitor(cfg, plan, build_cadence(cfg, plan, n_params=1000), **kwargs)


def one_step(model, opt, monitor, clip: float = 0.0):
    """A loop step shaped like train.py's; returns (loss, pre-clip norm, flat pre-clip grads)."""
    monitor.step_start()
    window = torch.randint(0, 64, (2, 17))
    loss = model.loss(window)
    loss.backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
    monitor.before_optimizer_step(model)
    opt.step()
    monitor.after_optimizer_step(model)
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm, flat


def test_jsonl_train_events_hold_every_o2_field(tmp_path):
    cfg, model, plan = setup("log.interval_steps=2")
    sinks = MultiSink([JsonlSink(tmp_path / "metrics.jsonl")])
    monitor = monitor_for(cfg, plan, sinks=sinks, precision="fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(1, plan.total_steps + 1):
        loss, norm, _ = one_step(model, opt, monitor)
        losses.append(loss.item())
        if monitor.is_log_step(step):
            monitor.log_step(step, loss, norm, 1e-3, tokens_seen=step * plan.tokens_per_step, skipped=0)
    sinks.close()
    events = read_jsonl(tmp_path / "metrics.jsonl", "train")
    assert [e["step"] for e in events] == [2, 4]
    for event in events:
        missing = [f for f in STEP_METRICS if f not in event]
        assert not missing, missing
        assert event["tokens_per_s"] > 0 and event["step_time_s"] > 0
        assert event["mfu"] is None and event["mem_allocated_gib"] is None  # CPU: no MFU, no CUDA memory
        assert event["tflops"] > 0 and event["rss_gib"] > 0
        assert math.isclose(event["ppl"], math.exp(event["loss"]), rel_tol=1e-9)
    assert [e["loss"] for e in events] == pytest.approx([losses[1], losses[3]], abs=0)
    assert events[-1]["eta_s"] == 0 and events[-1]["tokens_seen"] == 4 * plan.tokens_per_step
    assert events[0]["skipped"] == 0


def test_grad_stats_are_pre_clip_and_per_layer(tmp_path):
    cfg, model, plan = setup("log.interval_steps=1", "log.per_layer_interval=1", steps=1)
    monitor = monitor_for(cfg, plan, precision="fp32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    orig_step = opt.step

    def capture_then_step():
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        orig_step()

    opt.step = capture_then_step
    loss, norm, flat = one_step(model, opt, monitor, clip=1e-3)  # tiny clip: post-clip stats differ a lot
    metrics = monitor.log_step(1, loss, norm, 0.5, tokens_seen=32)
    assert metrics["grad_norm"] == pytest.approx(flat.norm().item(), rel=1e-5)
    assert metrics["grad_mean"] == pytest.approx(flat.mean().item(), rel=1e-4, abs=1e-9)
    assert metrics["grad_std"] == pytest.approx(flat.std(unbiased=False).item(), rel=1e-4)
    # per-layer norms, pre-clip: clipped grads rescaled by pre/post norm
    post = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    emb = grads["tok_emb.weight"].norm().item() * metrics["grad_norm"] / post
    assert metrics["grad_norm/tok_emb"] == pytest.approx(emb, rel=1e-4)
    assert {"grad_norm/blocks.0", "grad_norm/blocks.1", "grad_norm/norm"} <= set(metrics)
    # update / param ratio of block 0
    names = [n for n in before if group_of(n) == "blocks.0"]
    delta = sum((dict(model.named_parameters())[n].detach() - before[n]).square().sum() for n in names)
    base = sum(before[n].square().sum() for n in names)
    assert metrics["update_ratio/blocks.0"] == pytest.approx((delta / base).sqrt().item(), rel=1e-4)


def test_grad_stats_only_on_log_steps_and_per_layer_on_their_cadence():
    """Gradient statistics are gathered before the optimizer step of a log step only; per-layer norms only on
    every per_layer_interval-th log step. A log_step called off the cadence finds nothing queued."""
    cfg, model, plan = setup("log.interval_steps=3", "log.per_layer_interval=2", steps=12)
    monitor = monitor_for(cfg, plan, precision="fp32")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = {}
    for step in range(1, 13):
        loss, norm, _ = one_step(model, opt, monitor)
        logged[step] = monitor.log_step(step, loss, norm, 0.1, tokens_seen=step)
    with_grad_stats = [s for s, m in logged.items() if m["grad_mean"] is not None]
    with_layers = [s for s, m in logged.items() if "grad_norm/blocks.0" in m]
    assert with_grad_stats == [3, 6, 9, 12] and with_layers == [6, 12]
    assert [monitor.is_log_step(s) for s in range(1, 7)] == [False, False, True, False, False, True]
    assert all(("update_ratio/blocks.0" in m) == (s in (6, 12)) for s, m in logged.items())


def test_per_layer_statistics_cadence_follows_the_model_size():
    from tokenmill.train.cadence import AUTO_PER_LAYER_INTERVAL, AUTO_PER_LAYER_MAX_PARAMS

    cfg, _, plan = setup("log.interval_steps=5")
    assert build_cadence(cfg, plan, n_params=10_000).per_layer_every == AUTO_PER_LAYER_INTERVAL == 10
    assert build_cadence(cfg, plan, n_params=AUTO_PER_LAYER_MAX_PARAMS).per_layer_every == 0  # 1B+: off
    cfg, _, plan = setup("log.per_layer_grad_norms=false")
    assert build_cadence(cfg, plan, n_params=10_000).per_layer_every == 0
    cfg, _, plan = setup("log.per_layer_interval=3")
    assert build_cadence(cfg, plan, n_params=2 * AUTO_PER_LAYER_MAX_PARAMS).per_layer_every == 3  # explicit wins


def test_mfu_and_step_time_arithmetic(monkeypatch):
    cfg, model, plan = setup("log.interval_steps=3", steps=10)
    clock = [100.0]
    monkeypatch.setattr(monitor_mod.time, "perf_counter", lambda: clock[0])
    monitor = monitor_for(cfg, plan, precision="bf16", peak_tflops=100.0, flops_per_token=2e6)
    monitor.step_start()
    clock[0] += 1.0
    monitor.after_optimizer_step(model)
    clock[0] += 30.0  # eval / checkpoint between steps: not step time
    monitor.step_start()
    clock[0] += 0.5
    with monitor.paused():  # excluded work inside a step
        clock[0] += 7.0
    clock[0] += 0.5  # a skipped (non-finite) step: no optimizer step, its window ends at the next start
    monitor.step_start()
    clock[0] += 1.0
    monitor.after_optimizer_step(model)
    clock[0] += 5.0  # logging itself
    metrics = monitor.log_step(3, 3.0, 1.0, 1e-3, tokens_seen=64)
    assert metrics["step_time_s"] == pytest.approx(1.0)
    tokens_per_s = plan.tokens_per_step / 1.0
    assert metrics["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert metrics["tflops"] == pytest.approx(tokens_per_s * 2e6 / 1e12)
    assert metrics["mfu"] == pytest.approx(tokens_per_s * 2e6 / 100e12)
    assert metrics["eta_s"] == pytest.approx(7 * 1.0)
    assert metrics["grad_mean"] is None  # no before_optimizer_step: nothing invented
    auto = monitor_for(cfg, plan, precision="bf16")
    assert auto.peak_tflops is None  # CPU: never a guessed peak


def test_peak_for_precision():
    from tokenmill.metrics.flops import lookup_gpu

    spec = lookup_gpu("NVIDIA H100 80GB HBM3")
    assert monitor_mod.peak_tflops_for(spec, "bf16") == spec.bf16_tflops
    assert monitor_mod.peak_tflops_for(spec, "fp16") == spec.fp16_tflops
    assert monitor_mod.peak_tflops_for(None, "bf16") is None


def test_progress_bar_only_on_a_terminal():
    cfg, model, plan = setup("log.progress_bar=true", steps=3)
    plain = monitor_for(cfg, plan, precision="fp32", console=Console(file=io.StringIO()))
    assert plain.progress.progress is None
    out = io.StringIO()
    tty = monitor_for(cfg, plan, precision="fp32", console=Console(file=out, force_terminal=True, width=100))
    assert tty.progress.progress is not None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 4):
        loss, norm, _ = one_step(model, opt, tty)
        tty.log_step(step, loss, norm, 0.1, tokens_seen=step)
    assert tty.progress.progress.tasks[0].completed == 3
    tty.close()
    assert "3/3" in out.getvalue()
    off = monitor_for(
        cfg,
        plan,
        precision="fp32",
        console=Console(file=io.StringIO(), force_terminal=True),
        dist=type("D", (), {"device": torch.device("cpu"), "world_size": 2, "is_main": False})(),
    )
    assert off.progress.progress is None  # rank 1


@pytest.mark.gpu
def test_gpu_memory_and_mfu_from_the_peak_table():
    from tokenmill.metrics.flops import lookup_gpu

    cfg, model, plan = setup("log.interval_steps=1", steps=2)
    model = model.cuda()
    dist = type("D", (), {"device": torch.device("cuda"), "world_size": 1, "is_main": True})()
    monitor = monitor_for(cfg, plan, dist=dist, precision="bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor.step_start()
    loss = model.loss(torch.randint(0, 64, (2, 17), device="cuda"))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    monitor.before_optimizer_step(model)
    opt.step()
    monitor.after_optimizer_step(model)
    metrics = monitor.log_step(1, loss.detach(), norm, 1e-3, tokens_seen=32)
    assert metrics["mem_allocated_gib"] > 0 and metrics["mem_peak_gib"] >= metrics["mem_allocated_gib"]
    assert metrics["mem_reserved_gib"] >= metrics["mem_allocated_gib"]
    known = lookup_gpu(torch.cuda.get_device_name()) is not None
    assert (metrics["mfu"] is not None) == known
