"""Token losses of the train step: the Engine's `loss_fn` slot (plain or chunked next-token cross-entropy).

A loss function takes the model and one micro-batch on the device - {"tokens": (B, T+1), "targets": (B, T) with
IGNORE_INDEX where no loss is taken, optionally "doc_ids": (B, T+1)} - and returns the *summed* loss over the
valid targets. The engine divides it by the optimizer step's global count of valid targets, so masked tokens
(prompts, padding) weigh nothing and every valid token weighs the same on every rank and micro-step.

A loss function calls the model through `model.loss(...)`: FSDP2 gathers the root's parameters (embedding,
head) around that method. A fused linear-cross-entropy kernel or a policy-gradient loss is one more entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import nn

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def targets_of(batch: Batch) -> torch.Tensor:
    """(B, T) targets of a micro-batch: its "targets" when the data masks some, else tokens[:, 1:]."""
    return batch["targets"] if "targets" in batch else batch["tokens"][:, 1:]


def count_valid_targets(batch: Batch) -> torch.Tensor:
    """Targets that carry loss (!= IGNORE_INDEX), as a 0-dim tensor on the batch's device (no host sync)."""
    if "targets" not in batch:
        return torch.tensor(batch["tokens"][:, 1:].numel())
    return (batch["targets"] != IGNORE_INDEX).sum()


def plain_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy with one (B*T, V) logits matrix."""
    return model.loss(batch["tokens"], batch.get("doc_ids"), targets=targets_of(batch), reduction="sum")


def chunked_loss(model: nn.Module, batch: Batch, chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy over chunks of `chunk_size` tokens, logits recomputed in backward (less memory)."""
    return model.loss(
        batch["tokens"], batch.get("doc_ids"), targets=targets_of(batch), chunk_size=chunk_size, reduction="sum"
    )


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"plain": plain_loss, "chunked": chunked_loss}


def build_loss_fn(chunk_size: int = 0) -> LossFn:
    """The loss `train.loss_chunk_size` asks for: chunked when > 0, else plain."""
    if chunk_size > 0:
        return functools.partial(LOSSES["chunked"], chunk_size=chunk_size)
    return LOSSES["plain"]
