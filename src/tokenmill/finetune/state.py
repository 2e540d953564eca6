"""The GRPO loop's counters (`GRPOState`, a checkpoint part) and the models it samples and compares with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass
class GRPOState:
    """Saved in every RL checkpoint. `prompts_seen` is the prompt cursor: with the run seed it decides the next
    prompts; the step decides the sampling seeds (finetune/rollout.py)."""

    step: int = 0  # rollout batches done
    optimizer_steps: int = 0
    prompts_seen: int = 0
    tokens_seen: int = 0  # prompt + completion tokens trained on
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for item in fields(self):
            if item.name in state:
                setattr(self, item.name, int(state[item.name]))


def keep_rng(device: torch.device) -> Any:
    """A block whose random draws (weight init) leave the CPU and `device` RNG states as they were."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


class RolloutModel:
    """The whole policy on this rank, for sampling: the engine's model itself unless it is sharded (FSDP), in
    which case every rank gathers the full weights into one plain copy, refreshed once per step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._copy: nn.Module | None = None

    def current(self) -> nn.Module:
        if not self.engine.sharded:
            return self.engine.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from tokenmill.model import build_model

        full = get_model_state_dict(self.engine.model, options=StateDictOptions(full_state_dict=True))  # collective
        if self._copy is None:
            with keep_rng(self.engine.dist.device):  # initialising the copy must not move the run's RNG
                self._copy = build_model(self.engine.cfg.model, device=self.engine.dist.device)
        with torch.no_grad():
            self._copy.load_state_dict(full)
        return self._copy


def build_reference(init_from: str, device: torch.device) -> nn.Module:
    """The frozen starting policy for the KL term: the weights of `init_from` (a single-file checkpoint), even
    when the run resumes, since the KL is measured against where fine-tuning started."""
    from tokenmill.api import load_model

    with keep_rng(device):  # building it initialises weights first: keep the run's RNG
        reference = load_model(init_from, device=device)
    reference.requires_grad_(False)
    return reference
