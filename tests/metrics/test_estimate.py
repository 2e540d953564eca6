"""`tokenmill estimate`: exact counts, memory plan bytes, JSON output, budget timing, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tokenmill.cli import main
from tokenmill.config import load_config
from tokenmill.errors import UserError
from tokenmill.metrics.estimate import estimate, resolve_gpu
from tokenmill.metrics.flops import GPUS, flops_per_token
from tokenmill.metrics.memory import MODES, activation_bytes


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_llama3_1b_parameter_count(capsys):
    code, out, _ = run_cli(capsys, "--preset", "llama3-1b")
    assert code == 0
    assert "1,241,581,568" in out
    assert "H100 SXM" in out and "40%" in out and "50%" in out


def test_json_fields_and_exact_memory_plan(capsys):
    code, out, _ = run_cli(capsys, "--preset", "gpt2-124m", "--json", "--micro-batch", "4", "--gpu", "A100 80GB")
    assert code == 0
    report = json.loads(out)
    n = report["parameters"]["total"]
    assert n == 124_439_808  # = Hugging Face GPT2LMHeadModel
    assert report["parameters"]["trainable"] == n
    assert report["parameters"]["non_embedding"] == n - (50257 + 1024) * 768
    for mode in ("fp32", "bf16-mixed"):
        plan = report["memory"]["plan"][mode]
        assert plan["weights"] == 4 * n and plan["gradients"] == 4 * n and plan["optimizer"] == 8 * n
        assert plan["static_total"] == 16 * n
        for ac in ("none", "all"):
            assert plan["peak_total"][ac] == plan["static_total"] + plan["activations"][ac]["total"]
        assert plan["activations"]["all"]["total"] < plan["activations"]["none"]["total"]
    # The logits term is B x S x V x 4 bytes.
    assert report["memory"]["plan"]["bf16-mixed"]["activations"]["none"]["logits"] == 4 * 1024 * 50257 * 4
    assert report["memory"]["micro_batch"] == 4 and report["gpu"]["name"] == "A100 80GB"
    assert report["flops"]["per_token"] == 854_438_400  # hand count in tests/test_flops.py
    assert report["max_micro_batch"]["bf16-mixed"]["all"] >= report["max_micro_batch"]["bf16-mixed"]["none"] >= 1
    assert set(report["budget"]["time_s"]) == {"40%", "50%"}


def test_budget_time_at_mfu():
    cfg = load_config(["gpt2-124m"], None, ["train.total_tokens=1000000000"])
    report = estimate(cfg, GPUS["H100 SXM"])
    per_token = flops_per_token(cfg.model, 1024)
    assert report["budget"]["tokens"] == 10**9 and report["budget"]["source"] == "train.total_tokens"
    assert report["budget"]["time_s"]["40%"] == pytest.approx(1e9 * per_token / (0.4 * 989e12))
    assert report["budget"]["time_s"]["50%"] == pytest.approx(1e9 * per_token / (0.5 * 989e12))
    # Default budget: 20 tokens per parameter, shared by n GPUs.
    report = estimate(load_config(["gpt2-124m"], None, []), GPUS["A100 40GB"], n_gpus=8)
    assert report["budget"]["tokens"] == 20 * 124_439_808
    assert report["budget"]["time_s"]["50%"] == pytest.approx(20 * 124_439_808 * per_token / (0.5 * 312e12 * 8))


def test_vocab_zero_resolved_from_tokenizer_size():
    cfg = load_config(["tiny"], None, ["data.tokenizer_vocab_size=1000", "model.vocab_multiple_of=64"])
    report = estimate(cfg, GPUS["L4"], micro_batch=2)
    assert report["model"]["vocab_size"] == 1024  # 1000 rounded up to a multiple of 64
    assert any("tokenizer_vocab_size=1000" in note for note in report["notes"])
    act = activation_bytes(dataclasses.replace(cfg.model, vocab_size=1024), MODES["fp32"], 2, cfg.train.seq_len)
    assert report["memory"]["plan"]["fp32"]["activations"]["none"] == act


def test_unknown_gpu_is_one_line_exit_2(capsys):
    code, out, err = run_cli(capsys, "--preset", "gpt2-124m", "--gpu", "Voodoo 5")
    assert code == 2
    assert err.count("\n") == 1 and "unknown GPU 'Voodoo 5'" in err and "H100 SXM" in err
    with pytest.raises(UserError):
        resolve_gpu("NVIDIA GB200")


def test_bad_micro_batch_exit_2(capsys):
    code, _, err = run_cli(capsys, "--preset", "gpt2-124m", "--micro-batch", "0")
    assert code == 2 and "--micro-batch" in err


def test_device_name_accepted_and_does_not_fit(capsys):
    # A 1.2B model's static AdamW state (16 bytes x params = 18.5 GiB) does not fit a 16 GiB V100.
    code, out, _ = run_cli(capsys, "--preset", "llama3-1b", "--gpu", "Tesla V100-SXM2-16GB", "--json")
    report = json.loads(out)
    assert code == 0 and report["gpu"]["memory_gib"] == 16
    assert report["max_micro_batch"] == {"fp32": {"none": 0, "all": 0}, "bf16-mixed": {"none": 0, "all": 0}}


def test_vocab_zero_with_byte_tokenizer():
    # The byte tokenizer has 256 bytes + 3 specials = 259 ids -> 320 with vocab_multiple_of 64.
    cfg = load_config(["tiny"], None, ["data.tokenizer=byte"])
    report = estimate(cfg, GPUS["H100 SXM"])
    assert report["model"]["vocab_size"] == 320
    assert report["parameters"]["embedding"] == 320 * 256
