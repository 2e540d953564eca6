"""Activation checkpointing (AC): recompute a block's activations in backward instead of storing them.

Applied from outside the model (model code stays plain single-device PyTorch) by wrapping entries of
`model.blocks` with PyTorch's `checkpoint_wrapper` in non-reentrant mode (the mode that works with
torch.compile, FSDP2 and `torch.autograd.grad`; reentrant AC is deprecated, see torch.utils.checkpoint docs).
The RNG state is stashed and restored, so dropout masks in the recomputation equal the first pass and the
loss and gradients equal the un-checkpointed model exactly.

State-dict keys: the wrapper inserts `_checkpoint_wrapped_module.` into parameter names, but it
registers state-dict hooks that strip it on save and add it on load, so `model.state_dict()` keys are
the plain single-device keys and checkpoints load with or without AC. `parallel.wrappers.canonical_name()`
strips the prefix from names taken from `named_parameters()` (which the hooks do not touch).

Modes (`train.activation_checkpointing`): none; all (every block); every_k (blocks k-1, 2k-1, ...:
every k-th block counting from 1, as torchtitan's selective layer AC does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)

from tokenmill.errors import ConfigError

# mode -> predicate(block index, every) deciding whether that block is checkpointed
AC_MODES: dict[str, Callable[[int, int], bool]] = {
    "none": lambda i, every: False,
    "all": lambda i, every: True,
    "every_k": lambda i, every: (i + 1) % every == 0,
}


def apply_activation_checkpointing(model: nn.Module, mode: str = "all", every: int = 1) -> nn.Module:
    """Wrap the chosen entries of `model.blocks` (ModuleList or ModuleDict) in place; returns `model`.

    The block index used by every_k is the block's position in the full model (its key in
    `model.blocks`), so a pipeline stage holding blocks 4..7 checkpoints the same blocks as the full model.
    """
    if mode not in AC_MODES:
        raise ConfigError(
            f"train.activation_checkpointing={mode!r} is not allowed: choose one of " + ", ".join(sorted(AC_MODES))
        )
    if mode == "every_k" and every < 1:
        raise ConfigError(f"train.ac_every={every} is not allowed: must be >= 1")
    choose = AC_MODES[mode]
    blocks = model.blocks
    for name, block in list(blocks.named_children()):
        if is_checkpointed(block) or not choose(int(name), every):
            continue
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True)
        blocks.register_module(name, wrapped)
    return model


def is_checkpointed(module: nn.Module) -> bool:
    return hasattr(module, "_checkpoint_wrapped_module")
