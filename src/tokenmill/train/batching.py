"""Tokens are the unit of account: derive gradient accumulation and the step budget from token counts."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int  # sequences per forward pass per rank
    seq_len: int  # tokens per sequence (targets per row)
    world_size: int  # data-parallel ranks
    grad_accum: int  # micro-steps per optimizer step
    total_steps: int  # optimizer steps in the run
    total_tokens: int  # token budget the steps cover

    @property
    def tokens_per_micro_step(self) -> int:
        """Target tokens one rank processes per forward pass."""
        return self.micro_batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Target tokens per optimizer step over all ranks (the global batch)."""
        return self.tokens_per_micro_step * self.grad_accum * self.world_size

    @property
    def global_batch_sequences(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size


def plan_batches(
    micro_batch_size: int,
    seq_len: int,
    world_size: int,
    global_batch_tokens: int,
    total_tokens: int,
    max_steps: int,
    n_params: int,
    grad_accum: int = 0,
) -> BatchPlan:
    """Accumulation = global batch / (micro-batch x seq_len x world size), refusing numbers that don't divide.

    `world_size` is the data-parallel size (pipeline stages of one replica share a batch). An explicit
    `grad_accum` wins, and must agree with `global_batch_tokens` when both are set.

    The budget is `max_steps` when set, else `total_tokens`, else 20 tokens per parameter (Chinchilla,
    Hoffmann et al. 2022, arXiv:2203.15556).
    """
    per_pass = micro_batch_size * seq_len * world_size
    if grad_accum < 0:
        raise ConfigError(
            f"train.grad_accum={grad_accum} is not allowed: must be >= 1 (or 0 = derived from "
            f"train.global_batch_tokens)"
        )
    if grad_accum and global_batch_tokens and global_batch_tokens != per_pass * grad_accum:
        raise ConfigError(
            f"train.grad_accum={grad_accum} gives {per_pass * grad_accum} tokens per step (micro_batch_size x seq_len "
            f"x data-parallel size x grad_accum), but train.global_batch_tokens={global_batch_tokens}: set only one"
        )
    if grad_accum:
        accum = grad_accum
    elif global_batch_tokens == 0:
        accum = 1
    elif global_batch_tokens % per_pass:
        lower = max(per_pass, global_batch_tokens // per_pass * per_pass)
        raise ConfigError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of micro_batch_size x seq_len x "
            f"world_size = {micro_batch_size} x {seq_len} x {world_size} = {per_pass}; use e.g. {lower} or "
            f"{lower + per_pass}, or change train.micro_batch_size / train.seq_len"
        )
    else:
        accum = global_batch_tokens // per_pass
    tokens_per_step = per_pass * accum
    budget = total_tokens or 20 * n_params
    steps = max_steps or max(1, -(-budget // tokens_per_step))
    return BatchPlan(micro_batch_size, seq_len, world_size, accum, steps, steps * tokens_per_step)
