"""What a Checkpointer saves: named parts, each `Stateful` (state_dict / load_state_dict).

Most parts are the objects themselves (LR scheduler, data loader, TrainState, divergence detector, grad
scaler), as in torchtitan's `states=` dict. The model and the optimizer get small wrappers, because how
they are saved depends on the run: a plain model's weights go to safetensors under their plain names,
while FSDP shards and pipeline stages (`sharded=True`) are saved by every rank through DCP; the full
optimizer state under ZeRO-1 is a collective the engine provides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tokenmill.parallel.wrappers import canonical_name, unwrap

MODEL, OPTIMIZER = "model", "optimizer"  # the parts saved as weights / optimizer state


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class ModelState:
    """A model (under any wrappers) as a checkpoint part; `sharded` for FSDP shards or pipeline stages."""

    def __init__(self, model: nn.Module, sharded: bool = False) -> None:
        self.model = model
        self.sharded = sharded

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's tensors under their plain names (tied tensors appear under each name)."""
        return {canonical_name(key): value for key, value in unwrap(self.model).state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights in place (ties and devices are kept); a UserError names every key that does not fit."""
        from tokenmill.checkpoint.weights import load_weights_into

        load_weights_into(self.model, state)


class OptimizerState:
    """An optimizer as a checkpoint part. `full_state` returns the whole state in torch's format where the
    optimizer itself holds only a shard (ZeRO-1: a collective, None off rank 0)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        full_state: Callable[[torch.optim.Optimizer], dict[str, Any] | None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.full_state = full_state

    def state_dict(self) -> dict[str, Any] | None:
        return self.full_state(self.optimizer) if self.full_state is not None else self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


# a bare object under these names is wrapped (the wrapper, the bare type)
WRAPPED: dict[str, tuple[type, type]] = {
    MODEL: (ModelState, nn.Module),
    OPTIMIZER: (OptimizerState, torch.optim.Optimizer),
}


def as_part(name: str, part: Any) -> Stateful:
    """`part` as a Stateful: a bare model under "model" or optimizer under "optimizer" gets its wrapper."""
    if name in WRAPPED:
        wrapper, bare = WRAPPED[name]
        if isinstance(part, bare):
            return wrapper(part)
        if not isinstance(part, wrapper):
            raise TypeError(
                f"checkpoint part {name!r} must be a {wrapper.__name__} or a {bare.__name__}, not {type(part).__name__}"
            )
        return part
    if not isinstance(part, Stateful):
        raise TypeError(f"checkpoint part {name!r} ({type(part).__name__}) needs state_dict() and load_state_dict()")
    return part
