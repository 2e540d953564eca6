"""GRPO learns: on `copy` the reward rises from a random-init ~0.4M-parameter byte model within a couple of
minutes on one CPU thread, and on `addition` RL after an SFT warm-up raises held-out exact match."""

from __future__ import annotations

import pytest
from rl_helpers import MODEL_OVERRIDES, make_checkpoint, run_grpo

# 0.37M parameters; the step counts and LRs below were tuned on this model without QK-norm (tiny's default has it)
COPY_MODEL = (
    "model.d_model=128",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.ffn_hidden=256",
    "model.qk_norm=false",
)
SFT_STEPS, ADDITION_RL_STEPS, ADDITION_RL_LR = 150, 60, 1e-4


@pytest.mark.slow
def test_reward_rises_on_copy_from_random_init(tmp_path):
    source = make_checkpoint(tmp_path / "init", *COPY_MODEL, seed=0)
    result = run_grpo(
        str(source),
        str(tmp_path / "rl"),
        (
            "--rl.steps=200",
            "--rl.prompts_per_step=16",
            "--rl.group_size=8",
            "--rl.max_new_tokens=4",
            "--rl.rewards=[position_match:0.5,exact_eos:0.5]",
            "--rl.scale_rewards=none",  # r - group mean (Dr. GRPO): no std blow-up of tiny differences early on
            "--rl.eval_interval_steps=0",
            "--rl.log_samples=0",
            "--optim.lr=1e-3",
            "--log.jsonl=false",
            "--log.interval_steps=50",
        ),
    )
    rewards = result["rewards"]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    print(f"copy: mean reward of the first 20 steps {first:.3f}, of the last 20 {last:.3f}")
    assert last >= first + 0.2


@pytest.mark.slow
def test_addition_after_sft_warmup_rl_raises_heldout_exact_match(tmp_path):
    from tokenmill.cli import main

    base = make_checkpoint(tmp_path / "base", *COPY_MODEL, seed=0)
    sft_set = tmp_path / "addition_sft.jsonl"
    assert main(["rl", "--task", "addition", "--write-sft-set", str(sft_set), "--sft-examples", "8000"]) == 0
    model = [o for o in MODEL_OVERRIDES if o.startswith("model.")] + list(COPY_MODEL)
    sft_run = tmp_path / "sft"
    sft = [
        "data.tokenizer=byte",
        "data.format=prompt_completion",
        f"data.sources=[{sft_set}]",
        f"train.init_from={base}",
        f"train.out_dir={sft_run}",
        f"train.max_steps={SFT_STEPS}",
        "train.seq_len=32",
        "train.micro_batch_size=16",
        "train.precision=fp32",
        "train.device=cpu",
        "optim.name=adamw",  # the LRs here and below were tuned for AdamW, not the Muon pretraining default
        "optim.lr=3e-3",
        "schedule.warmup_steps=10",
        "eval.interval_steps=0",
        "eval.sample_prompts=[]",
        "log.progress_bar=false",
        "log.interval_steps=50",
    ]
    assert main(["train", "--preset", "tiny", *("--" + o for o in model + sft)]) == 0
    result = run_grpo(
        str(sft_run),
        str(tmp_path / "rl"),
        (
            "--rl.task=addition",
            "--rl.rewards=[]",
            f"--rl.steps={ADDITION_RL_STEPS}",
            "--rl.prompts_per_step=16",
            "--rl.group_size=8",
            "--rl.eval_prompts=64",
            "--rl.eval_interval_steps=0",
            "--rl.log_samples=0",
            "--optim.name=adamw",
            f"--optim.lr={ADDITION_RL_LR}",
        ),
    )
    before, after = result["evals"][0]["accuracy"], result["evals"][ADDITION_RL_STEPS]["accuracy"]
    print(f"addition: held-out exact match after SFT {before:.3f}, after RL {after:.3f}")
    assert after > before
