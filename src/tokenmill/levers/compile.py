"""torch.compile as a lever: which scope a layout compiles (`train.compile_scope`) and compiling it.

| scope  | what is compiled                                             | when `auto` picks it                       |
|--------|--------------------------------------------------------------|--------------------------------------------|
| model  | the whole train loss (embedding, blocks, head, cross-entropy) | nothing below needs per-block graphs      |
|        | as one graph; under DDP / ZeRO-1 the wrapped module          |                                            |
| blocks | each block in place (`Module.compile`), before FSDP          | FSDP2, pipeline stages, activation         |
|        |                                                              | checkpointing, FP8, a fused or custom loss |

One graph lets Inductor fuse across block boundaries and around the head and loss, and saves a Python round
trip per block, as nanoGPT's `torch.compile(model)` does. Per-block graphs are what FSDP2 needs (its
all-gather hooks sit between blocks), what a pipeline stage holds, and what torchtitan applies with activation
checkpointing and FP8; identical blocks share one compiled graph, so they also compile faster for deep models.
Compiling in place keeps state-dict keys free of `_orig_mod.`; the whole-loss scope wraps a function, not the
module, so it leaves them alone too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.errors import UserError
from tokenmill.levers.loss import LossFn


@dataclass(frozen=True)
class CompileScope:
    blocks: bool  # compile every block in place, before FSDP
    step: bool  # compile the whole loss function (DDP / ZeRO-1: the wrapped module)


# The keys (plus "auto") are COMPILE_SCOPE_NAMES in train/config.py, the names config validation accepts.
COMPILE_SCOPES: dict[str, CompileScope] = {
    "model": CompileScope(blocks=False, step=True),
    "blocks": CompileScope(blocks=True, step=False),
}
NO_COMPILE = CompileScope(blocks=False, step=False)


def needs_blocks(strategy: str, pp: int, activation_checkpointing: str, fp8: str, plain_loss: bool) -> list[str]:
    """What in this layout asks for per-block graphs (empty: the whole model may be one graph)."""
    reasons = []
    if strategy == "fsdp":
        reasons.append("parallel.strategy=fsdp")
    if pp > 1:
        reasons.append(f"parallel.pp={pp}")
    if activation_checkpointing != "none":
        reasons.append(f"train.activation_checkpointing={activation_checkpointing}")
    if fp8 != "off":
        reasons.append(f"train.fp8={fp8}")
    if not plain_loss:
        reasons.append("a fused or custom loss function")
    return reasons


def resolve_compile_scope(
    compile_: bool,
    requested: str,
    *,
    strategy: str,
    pp: int,
    activation_checkpointing: str = "none",
    fp8: str = "off",
    plain_loss: bool = True,
) -> CompileScope:
    """The scope to compile (`NO_COMPILE` when `compile_` is off); a UserError when `model` cannot be one graph.

    FSDP2 and pipeline stages cannot run as one graph; activation checkpointing is applied per block and
    stays per block (compiling it whole is not tested here).
    """
    if not compile_:
        return NO_COMPILE
    reasons = needs_blocks(strategy, pp, activation_checkpointing, fp8, plain_loss)
    if requested == "auto":
        return COMPILE_SCOPES["blocks" if reasons else "model"]
    hard = [r for r in reasons if r.startswith(("parallel.", "train.activation_checkpointing"))]
    if requested == "model" and hard:
        raise UserError(
            f"train.compile_scope=model cannot compile one graph with {', '.join(hard)}: use "
            f"train.compile_scope=auto or blocks"
        )
    return COMPILE_SCOPES[requested]


def compile_blocks(blocks: Iterable[nn.Module]) -> None:
    """Compile each block in place (`Module.compile`: no wrapper, so no `_orig_mod.` in state-dict keys)."""
    for block in blocks:
        block.compile()


def compile_loss(loss_fn: LossFn) -> LossFn:
    """`loss_fn(model, batch)` as one compiled graph through the whole model, its head and the loss."""
    return torch.compile(loss_fn)
