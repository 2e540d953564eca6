"""Start-up banner (SPEC O1): every field present, numbers consistent with the plan, FLOPs and peak table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tokenmill.config import load_config
from tokenmill.metrics.banner import build_banner, render_banner
from tokenmill.metrics.flops import flops_breakdown
from tokenmill.model import param_counts
from tokenmill.train.batching import plan_batches

O1 = {
    "model": {
        "params_total",
        "params_non_embedding",
        "params_trainable",
        "n_layers",
        "d_model",
        "n_heads",
        "seq_len",
        "vocab_size",
    },
    "training": {
        "micro_batch_size",
        "grad_accum",
        "global_batch_sequences",
        "tokens_per_step",
        "total_steps",
        "total_tokens",
    },
    "hardware": {"device", "count", "memory_gib", "precision", "strategy"},
    "theoretical": {"peak_tflops", "flops_per_token", "attention_ffn_ratio", "expected_tokens_per_s_at_50_mfu"},
}


def _cfg():
    return load_config(["tiny"], overrides=["model.vocab_size=256", "train.seq_len=64", "train.micro_batch_size=4"])


def test_banner_dict_has_every_o1_field_and_consistent_numbers():
    cfg = _cfg()
    counts = param_counts(cfg.model)
    plan = plan_batches(4, 64, 1, 4 * 64 * 2, 0, 10, counts["total"])
    info = build_banner(cfg, counts, plan, precision="fp32").as_dict()
    for section, keys in O1.items():
        assert keys <= set(info[section]), (section, keys - set(info[section]))
    assert info["model"]["params_total"] == counts["total"]
    assert info["model"]["params_non_embedding"] == counts["total"] - 256 * 256
    assert info["training"]["grad_accum"] == 2 and info["training"]["tokens_per_step"] == 512
    assert info["training"]["total_tokens"] == 5120
    assert info["hardware"]["device"] == "cpu" and info["hardware"]["count"] == 1
    assert info["hardware"]["memory_gib"] > 0
    flops = flops_breakdown(cfg.model, 64)
    assert info["theoretical"]["flops_per_token"] == flops["total"]
    assert info["theoretical"]["attention_ffn_ratio"] == pytest.approx(
        (flops["attention_proj"] + flops["attention_scores"]) / flops["ffn"]
    )
    assert info["theoretical"]["peak_tflops"] is None  # CPU: no peak, so no expected tokens/s
    assert info["theoretical"]["expected_tokens_per_s_at_50_mfu"] is None


def test_banner_expected_throughput_with_a_peak_and_rendering():
    cfg = _cfg()
    plan = plan_batches(4, 64, 1, 0, 0, 10, 1)
    dist = type("D", (), {"device": "cpu", "world_size": 2})()
    banner = build_banner(
        cfg, None, plan, dist, "bf16", resumed_from="runs/x/checkpoints/step_00000010", peak_tflops=100.0
    )
    theo = banner.as_dict()["theoretical"]
    assert theo["expected_tokens_per_s_at_50_mfu"] == pytest.approx(0.5 * 100e12 * 2 / theo["flops_per_token"])
    assert banner.as_dict()["hardware"]["strategy"] == cfg.parallel.strategy
    out = io.StringIO()
    banner.print(Console(file=out, width=160))
    text = out.getvalue()
    for word in ("model", "training", "hardware", "theoretical", "params total", "tok/s at 50% MFU", "step_00000010"):
        assert word in text
    assert render_banner(banner.as_dict()) is not None


def test_banner_shows_the_cadence_in_steps():
    from tokenmill.train.cadence import build_cadence

    cfg = load_config(
        ["tiny"],
        overrides=[
            "model.vocab_size=256",
            "train.seq_len=64",
            "train.micro_batch_size=4",
            "log.interval_steps=5",
            "eval.interval_tokens=2048",
            "checkpoint.interval_steps=0",
        ],
    )
    plan = plan_batches(4, 64, 1, 0, 0, 100, 1)
    banner = build_banner(cfg, None, plan, precision="fp32", cadence=build_cadence(cfg, plan, n_params=1))
    training = banner.as_dict()["training"]
    assert (training["log_every_steps"], training["eval_every_steps"], training["checkpoint_every_steps"]) == (5, 8, 0)
    out = io.StringIO()
    banner.print(Console(file=out, width=160))
    assert "eval every" in out.getvalue()


def test_banner_prints_the_effective_recipe():
    cfg = load_config(
        ["tiny"],
        overrides=["model.vocab_size=256", "model.tie_embeddings=false", "optim.head_lr=1e-3"]
        + ["schedule.warmup_steps=5"],
    )
    plan = plan_batches(4, 64, 1, 0, 0, 100, 1)
    banner = build_banner(cfg, None, plan, precision="fp32")
    recipe = banner.as_dict()["recipe"]
    groups = "Muon 0.02: matrices | AdamW 0.001: head | AdamW 0.003: embeddings, norms, biases"
    assert recipe["optimizer_groups"] == groups
    assert recipe["schedule"] == "wsd-linear: warmup 5 steps, peak to step 80, then linearly to 0.1x at 100"
    out = io.StringIO()
    banner.print(Console(file=out, width=200))
    assert f"recipe groups: {recipe['optimizer_groups']}" in out.getvalue()
    assert f"recipe schedule: {recipe['schedule']}" in out.getvalue()
