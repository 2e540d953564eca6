"""Rollouts: sample each prompt's group with the KV-cache engine, and turn the samples into training batches.

Every group is sampled (one prefill, `group_size` rows) with a seed derived from the run seed, the step and the
prompt's index in the global batch: a prompt gets the same samples whichever rank draws it and however many
ranks there are, so the samples differ between ranks (different prompts) and resume is exact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.finetune.config import RLConfig
from tokenmill.finetune.tasks import Example
from tokenmill.generation.engine import Generator
from tokenmill.generation.params import Completion, SamplingParams
from tokenmill.levers.loss import IGNORE_INDEX


@dataclass
class Rollout:
    """One rank's samples of one step, group-major: samples[i * group_size + j] is sample j of examples[i]."""

    examples: list[Example]
    prompt_ids: list[list[int]]  # per example
    samples: list[Completion]
    texts: list[str]  # decoded completions, EOS removed

    def per_sample(self, group_size: int) -> tuple[list[str], dict[str, list]]:
        """Prompts and reward fields repeated per sample (the reward functions' calling shape)."""
        prompts = [e.prompt for e in self.examples for _ in range(group_size)]
        fields: dict[str, list] = {
            "completion_ids": [s.token_ids for s in self.samples],
            "finish_reason": [s.finish_reason for s in self.samples],
        }
        for name in self.examples[0].columns if self.examples else ():
            fields[name] = [e.columns[name] for e in self.examples for _ in range(group_size)]
        return prompts, fields


def group_seed(seed: int, step: int, prompt_index: int) -> int:
    """Sampling seed of one group: the same for the same (run seed, step, global prompt index)."""
    return random.Random(f"grpo/{seed}/{step}/{prompt_index}").getrandbits(63)


def sample_groups(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], seeds: Sequence[int], cfg: RLConfig
) -> Rollout:
    """`cfg.group_size` samples of every example, all groups in one batch (the engine switches the model to
    eval mode while sampling; every row has its own generator, so batching does not change the draws)."""
    generator = Generator(model, tokenizer, max_batch_size=max(1, len(examples) * cfg.group_size))
    prompt_ids = [generator.prompt_ids(e.prompt) for e in examples]
    requests = []
    for index, (ids, seed) in enumerate(zip(prompt_ids, seeds, strict=True)):
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
            n=cfg.group_size,
        )
        requests.append(generator.submit(ids, params, prompt_index=index))
    samples = [c for request in requests for c in request.completions()]
    texts = [tokenizer.decode([t for t in s.token_ids if t != tokenizer.eos_id]) for s in samples]
    return Rollout(list(examples), prompt_ids, samples, texts)


def greedy_answers(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int) -> Rollout:
    """One greedy completion per example (held-out evaluation)."""
    generator = Generator(model, tokenizer, max_batch_size=max(1, len(examples)))
    prompt_ids = [generator.prompt_ids(e.prompt) for e in examples]
    samples = generator.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    texts = [tokenizer.decode([t for t in s.token_ids if t != tokenizer.eos_id]) for s in samples]
    return Rollout(list(examples), prompt_ids, samples, texts)


def build_batches(
    rollout: Rollout,
    advantages: torch.Tensor,
    group_size: int,
    loss_norm: str,
    pad_id: int,
    micro_batch_size: int,
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of prompt + completion rows, right-padded: tokens (B, T+1), targets (B, T) with
    IGNORE_INDEX on prompt and padding positions, advantages (B,), weights (B, T).

    weights is 1 per completion token, or 1 / completion length for loss_norm="sequence" (each sequence's
    mean, then the mean over sequences once the loop divides by the sequence count).
    """
    rows = []
    for index, sample in enumerate(rollout.samples):
        prompt = rollout.prompt_ids[index // group_size]
        rows.append((prompt, sample.token_ids))
    size = micro_batch_size or len(rows)
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(p) + len(c) for p, c in chunk)  # tokens per row (T + 1)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width - 1), IGNORE_INDEX, dtype=torch.long)
        weights = torch.zeros((len(chunk), width - 1), dtype=torch.float32)
        for row, (prompt, completion) in enumerate(chunk):
            sequence = prompt + completion
            tokens[row, : len(sequence)] = torch.tensor(sequence)
            first = len(prompt) - 1  # target index that predicts the first completion token
            targets[row, first : first + len(completion)] = torch.tensor(completion)
            weight = 1.0 / len(completion) if loss_norm == "sequence" else 1.0
            weights[row, first : first + len(completion)] = weight
        batches.append(
            {
                "tokens": tokens,
                "targets": targets,
                "advantages": advantages[start : start + size].float().cpu(),
                "weights": weights,
            }
        )
    return batches


def local_denominator(batches: Sequence[dict[str, torch.Tensor]], loss_norm: str, max_new_tokens: int) -> float:
    """This rank's share of the loss normalisation: completion tokens (token), sequences (sequence) or
    sequences x max_new_tokens (constant, Dr. GRPO). The loop sums it over ranks."""
    if loss_norm == "token":
        return float(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches))
    sequences = sum(b["tokens"].shape[0] for b in batches)
    return float(sequences * (max_new_tokens if loss_norm == "constant" else 1))
