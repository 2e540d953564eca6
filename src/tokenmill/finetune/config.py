"""The `rl` config section: what `tokenmill rl` samples, how it scores and how it turns rewards into updates.

A leaf module (no torch): the CLI builds `--rl.key` options and `config show` prints it without loading the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_choice, require_positive

# TASK_NAMES are the keys of tokenmill.finetune.tasks.TASKS (tests/finetune keeps them equal); loss_norm is
# implemented in finetune/rollout.py, scale_rewards in finetune/objective.py.
LOSS_NORM_NAMES = ("token", "sequence", "constant")
SCALE_REWARD_NAMES = ("group", "none")
TASK_NAMES = ("copy", "reverse", "addition", "mcq")


@dataclass
class RLConfig:
    """GRPO with verifiable rewards (tokenmill rl)."""

    task: str = opt("copy", "built-in task: copy, reverse, addition (after an SFT warm-up) or mcq (rl.task_file)")
    task_file: str = opt("", "mcq: jsonl of {question, options, answer} (answer = the correct option's letter)")
    rewards: list[str] = opt(
        [],
        "reward functions as name[:weight] or module:function[:weight], summed with their weights; [] = the task's own",
    )
    steps: int = opt(100, "rollout batches (RL steps); each makes iterations_per_batch optimizer steps")
    prompts_per_step: int = opt(16, "prompts per step over all ranks (a multiple of the data-parallel size)")
    group_size: int = opt(8, "samples per prompt; advantages compare the samples of one prompt (>= 2)")
    max_new_tokens: int = opt(16, "completion tokens at most")
    temperature: float = opt(1.0, "sampling temperature of rollouts (> 0; the policy's log-probs use it too)")
    top_p: float = opt(1.0, "nucleus sampling of rollouts (1 = off)")
    micro_batch_size: int = opt(0, "sequences per forward/backward on each rank; 0 = all of the rank's rollouts")
    iterations_per_batch: int = opt(1, "optimizer steps on each rollout batch (> 1 makes the clipped ratio matter)")
    epsilon: float = opt(0.2, "PPO clip: the ratio is kept within [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float = opt(0.0, "upper clip (DAPO's clip-higher, arXiv:2503.14476); 0 = epsilon")
    loss_norm: str = opt(
        "token",
        "token: / completion tokens of the whole batch; sequence: mean per sequence, then over sequences; "
        "constant: / (sequences x max_new_tokens) (Dr. GRPO, arXiv:2503.20783)",
    )
    scale_rewards: str = opt("group", "group: advantages / the group's reward std; none: only minus the mean")
    beta: float = opt(0.0, "weight of the k3 KL to the starting model; 0 = no reference model is built")
    eval_interval_steps: int = opt(10, "held-out exact match every N steps (and at start and end); 0 = start and end")
    eval_prompts: int = opt(64, "held-out prompts per evaluation (greedy decoding)")
    eval_fraction: float = opt(0.1, "share of the task's prompts held out from training for evaluation")
    zero_std_warning: float = opt(0.9, "warn when more than this share of groups has one reward for all samples")
    log_samples: int = opt(2, "sample completions logged per log step")

    def validate(self) -> None:
        require_choice("rl.task", self.task, TASK_NAMES)
        require_positive(self, "rl", "steps", "prompts_per_step", "max_new_tokens", "iterations_per_batch")
        require_positive(self, "rl", "micro_batch_size", "eval_interval_steps", "eval_prompts", allow_zero=True)
        require_positive(self, "rl", "beta", "epsilon", "epsilon_high", "log_samples", allow_zero=True)
        require(
            isinstance(self.group_size, int) and self.group_size >= 2,
            "rl.group_size",
            self.group_size,
            "give >= 2 samples per prompt: a group of one has no baseline to compare against, so it learns nothing",
        )
        require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "rl.temperature",
            self.temperature,
            "give a number > 0 (rollouts must explore; greedy decoding is used only for held-out evaluation)",
        )
        require(0 < self.top_p <= 1, "rl.top_p", self.top_p, "give a number in (0, 1]")
        require(0 < self.eval_fraction < 1, "rl.eval_fraction", self.eval_fraction, "give a number in (0, 1)")
        require(
            0 <= self.zero_std_warning <= 1, "rl.zero_std_warning", self.zero_std_warning, "give a number in [0, 1]"
        )
        require_choice("rl.loss_norm", self.loss_norm, LOSS_NORM_NAMES)
        require_choice("rl.scale_rewards", self.scale_rewards, SCALE_REWARD_NAMES)
        require(
            self.task != "mcq" or bool(self.task_file.strip()),
            "rl.task_file",
            self.task_file,
            "rl.task=mcq needs a jsonl of questions: --rl.task_file=questions.jsonl",
        )
