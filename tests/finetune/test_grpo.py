"""`grpo(cfg)` end to end on a tiny CPU model: metrics, a normal output checkpoint, bitwise resume, and 2 gloo
ranks equal to one process with the same prompts per step."""

from __future__ import annotations

import pytest
import torch
from rl_helpers import make_checkpoint, rl_args, run_grpo

import tokenmill
from dist_helpers import run_ranks
from tokenmill.cli import main
from tokenmill.metrics.sinks import read_jsonl

STEP_METRICS = {
    "reward",
    "reward_std",
    "reward/rl_rewards:first_byte",
    "reward/position_match",
    "reward/exact_eos",
    "frac_reward_zero_std",
    "completion_length_mean",
    "completion_length_max",
    "clip_fraction",
    "kl",
    "entropy",
    "grad_norm",
    "lr",
    "loss",
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("source"))


def test_rl_command_logs_every_metric_and_writes_a_checkpoint_generate_reads(source, tmp_path, capsys):
    out = tmp_path / "rl"
    assert main(rl_args(source, out, "--rl.steps=2", "--rl.beta=0.05", "--rl.iterations_per_batch=2")) == 0
    train = read_jsonl(out / "metrics.jsonl", "train")
    assert [e["step"] for e in train] == [1, 2]
    assert STEP_METRICS <= set(train[0])
    assert all(e["kl"] >= 0 and 0 <= e["clip_fraction"] <= 1 and e["completion_length_max"] <= 4 for e in train)
    evals = read_jsonl(out / "metrics.jsonl", "eval")
    assert [e["step"] for e in evals] == [0, 2] and all(0 <= e["accuracy"] <= 1 for e in evals)
    assert read_jsonl(out / "metrics.jsonl", "sample")
    model = tokenmill.load_model(out)  # a normal checkpoint: config.yaml + weights
    assert not torch.equal(model.tok_emb.weight, tokenmill.load_model(source).tok_emb.weight)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "abc|", "--max-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("abc|")


def test_rl_checkpoint_keeps_the_chat_template_of_its_source(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    source = make_checkpoint(tmp_path / "sft", chat_template=template)
    out = tmp_path / "rl"
    assert main(rl_args(source, out, "--rl.steps=1")) == 0
    assert (out / "checkpoints" / "step_00000001" / "chat_template.jinja").read_text() == template


def test_resumed_run_equals_the_uninterrupted_run_bitwise(source, tmp_path):
    extra = ("--checkpoint.interval_steps=2", "--rl.iterations_per_batch=2")
    whole = run_grpo(str(source), str(tmp_path / "whole"), ("--rl.steps=4", *extra))
    first = run_grpo(str(source), str(tmp_path / "parts"), ("--rl.steps=2", *extra))
    rest = run_grpo(str(source), str(tmp_path / "parts"), ("--rl.steps=4", *extra), resume=True)
    assert first["rewards"] + rest["rewards"] == whole["rewards"]
    assert rest["evals"][4] == whole["evals"][4]
    assert whole["weights"].keys() == rest["weights"].keys()
    assert all(torch.equal(whole["weights"][k], rest["weights"][k]) for k in whole["weights"])


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_gloo_ranks_equal_one_process(source, tmp_path, strategy):
    extra = ("--rl.steps=3", "--rl.loss_norm=sequence")
    single = run_grpo(str(source), str(tmp_path / "one"), extra)
    ranks = run_ranks(
        run_grpo, 2, str(source), str(tmp_path / "two"), (*extra, f"--parallel.strategy={strategy}"), None, timeout=240
    )
    # same prompts and seeds: the same samples (the means differ only in summation order)
    assert ranks[0]["rewards"] == pytest.approx(single["rewards"], abs=1e-12)
    assert ranks[0]["evals"].keys() == single["evals"].keys()
    for step, metrics in single["evals"].items():
        assert ranks[0]["evals"][step] == pytest.approx(metrics, abs=1e-12)
    for key, value in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-5, atol=1e-6)


def test_control_stop_request_saves_and_ends_the_run_then_resume_finishes(source, tmp_path, monkeypatch):
    out = tmp_path / "rl"
    monkeypatch.setenv("RL_STOP_RUN", str(out))
    stopping = ("--rl.steps=3", "--rl.rewards=[rl_rewards:stop_during_first_step,position_match]")
    stopped = run_grpo(str(source), str(out), stopping)
    assert stopped["status"] == "stopped" and len(stopped["rewards"]) == 1
    saved = read_jsonl(out / "metrics.jsonl", "checkpoint")
    assert [(e["step"], e["reason"]) for e in saved] == [(1, "stop")]
    finished = run_grpo(str(source), str(out), ("--rl.steps=3", "--rl.rewards=[position_match]"), resume=True)
    assert finished["status"] == "completed" and len(finished["rewards"]) == 2
