"""The training step's mechanics for one rank: wrap the model, run a micro-step, clip, build the optimizer.

`train()` says *what* happens each step; the engine knows *how* under the chosen strategy. Wrappers are applied
in one order (STYLE rule 1): pipeline split -> activation checkpointing -> torch.compile -> FSDP2 / DDP.
`unwrapped` is the plain module whose state dict has no `module.` / `_orig_mod.` prefixes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from tokenmill.config import Config
from tokenmill.parallel.activation import apply_activation_checkpointing
from tokenmill.parallel.dist import DistInfo
from tokenmill.precision import Precision


class Engine:
    def __init__(self, model: torch.nn.Module, cfg: Config, dist: DistInfo, precision: Precision) -> None:
        self.cfg = cfg
        self.dist = dist
        self.precision = precision
        self.unwrapped = model
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
        if cfg.train.compile:
            # Per-block, in place (torchtitan's choice): keys stay clean and each block compiles once.
            for block in model.blocks:
                block.compile()
        self.model = model

    def build_optimizer(self, build: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        """The optimizer over this rank's parameters (strategies that shard optimizer state wrap it here)."""
        return build(self.unwrapped)

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce only on the last accumulation micro-step (no-op in a single process)."""
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict[str, torch.Tensor], scaler: torch.amp.GradScaler, denominator: int,
                         sync: bool) -> torch.Tensor:
        """Loss of one micro-batch divided by the step's token count, back-propagated; returns it detached.

        Summing token losses and dividing by the token count of the whole step makes accumulation exact:
        (x1 + x2) / (n1 + n2), not x1/n1 + x2/n2 (torchtune PR #1875).
        """
        device = self.dist.device
        tokens = batch["tokens"].to(device, non_blocking=True)
        doc_ids = batch["doc_ids"].to(device, non_blocking=True) if self.cfg.train.document_masking else None
        with self.sync_context(sync):
            with self.precision.autocast():
                loss = self.model.loss(tokens, doc_ids, chunk_size=self.cfg.train.loss_chunk_size,
                                       reduction="sum") / denominator
            scaler.scale(loss).backward()
        return loss.detach()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Pre-clip global gradient norm (clipping only when max_norm > 0)."""
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def build_engine(model: torch.nn.Module, cfg: Config, dist: DistInfo, precision: Precision) -> Engine:
    return Engine(model, cfg, dist, precision)
