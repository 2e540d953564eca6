"""GRPO learns: on `copy` the reward rises from a random-init ~0.4M-parameter byte model within a couple of
minutes on one CPU thread, and on `addition` RL after an SFT warm-up raises held-out exact match."""

from __future__ import annotations

import pytest
from rl_helpers import make_checkpoint, run_grpo

COPY_MODEL = ("model.d_model=128", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_hidden=256")  # 0.37M parameters


@pytest.mark.slow
def test_reward_rises_on_copy_from_random_init(tmp_path):
    source = make_checkpoint(tmp_path / "init", *COPY_MODEL, seed=0)
    result = run_grpo(
        str(source),
        str(tmp_path / "rl"),
        (
            "--rl.steps=150",
            "--rl.prompts_per_step=16",
            "--rl.group_size=8",
            "--rl.max_new_tokens=4",
            "--rl.rewards=[position_match:0.5,exact_eos:0.5]",
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
