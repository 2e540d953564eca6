"""Pipeline parallelism: split the blocks into stages and run a torch.distributed.pipelining schedule.

Layout. The `pp` ranks of one data-parallel replica hold `pp x stages_per_rank` consecutive stages: the
first stage also owns the token (and learned position) embedding, the last owns the final norm and the
output head and computes the loss. Single-stage schedules put stage r on pp-rank r; interleaved ones put
stages r and r + pp on pp-rank r ("looped"), and the V-shaped ZBV schedule puts r and 2pp - 1 - r there.
Each stage keeps the full model's parameter names (`blocks.5.attn.q_proj.weight`), so checkpoints are
layout-free and DCP reshards them to any other pp degree or strategy.

Microbatches: n_microbatches = pp x stages_per_rank x pp_microbatch_scale, and the
`train.micro_batch_size` sequences each replica processes per micro-step are split into that many
pipeline microbatches, so micro_batch_size must be a multiple of it. A larger scale shrinks the bubble.

What does not cross stages: only the hidden states (B, T, d) travel between stages, so attention is
plain causal - `train.document_masking` (doc_ids) is refused with pp > 1 - and the output head cannot be
tied to the input embedding (they live on different ranks; set model.tie_embeddings=false). The chunked
loss (`train.loss_chunk_size`) is not used: the last stage returns logits of one microbatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenmill.errors import UserError

# schedule name (parallel.pp_schedule) -> (torch.distributed.pipelining class name, stages per rank)
# The keys are PP_SCHEDULE_NAMES in parallel/config.py, the names config validation accepts (a test keeps them equal).
PP_SCHEDULES: dict[str, tuple[str, int]] = {
    "GPipe": ("ScheduleGPipe", 1),
    "1F1B": ("Schedule1F1B", 1),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", 2),
    "LoopedBFS": ("ScheduleLoopedBFS", 2),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", 2),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", 2),
}


def schedule_info(name: str) -> tuple[str, int]:
    if name not in PP_SCHEDULES:
        raise UserError(f"parallel.pp_schedule={name!r} is not a schedule: choose one of {', '.join(PP_SCHEDULES)}")
    return PP_SCHEDULES[name]


def n_microbatches(pp: int, schedule: str, scale: int) -> int:
    """Pipeline microbatches per micro-step: pp x stages_per_rank x microbatch scale (see the module docstring)."""
    return pp * schedule_info(schedule)[1] * scale


def check_microbatches(micro_batch_size: int, pp: int, schedule: str, scale: int) -> int:
    """The number of pipeline microbatches; a UserError naming the numbers when the batch does not divide."""
    n = n_microbatches(pp, schedule, scale)
    spr = schedule_info(schedule)[1]
    if micro_batch_size % n:
        raise UserError(
            f"train.micro_batch_size={micro_batch_size} is not a multiple of the {n} pipeline microbatches "
            f"(parallel.pp={pp} x {spr} stages per rank for {schedule} x parallel.pp_microbatch_scale={scale}); "
            f"set train.micro_batch_size to a multiple of {n} or lower parallel.pp_microbatch_scale"
        )
    return n


def stage_ids_for_rank(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """Global stage indices held by `pp_rank` (looped for interleaved schedules, V-shaped for ZBV)."""
    spr = schedule_info(schedule)[1]
    if spr == 1:
        return [pp_rank]
    if schedule == "ZBVZeroBubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(spr)]


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Block indices of each stage: as even as possible, earlier stages take the remainder."""
    if n_layers < n_stages:
        raise UserError(
            f"model.n_layers={n_layers} is fewer than the {n_stages} pipeline stages; use more layers, "
            f"a lower parallel.pp, or a schedule with 1 stage per rank (GPipe, 1F1B)"
        )
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class StageModule(nn.Module):
    """The part of a Transformer one stage runs, with the full model's parameter names.

    forward: first stage (B, T) token ids -> (B, T, d); middle (B, T, d) -> (B, T, d); last -> (B, T, V) logits.
    """

    def __init__(self, model: nn.Module, block_ids: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last = first, last
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.emb_drop = model.emb_drop if first else None
        self.rope = model.rope  # non-persistent cos/sin buffers, needed by every stage's attention
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.backend = model.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.model.position import position_ids
        from tokenmill.model.transformer import BlockContext

        T = x.shape[1]
        pos = position_ids(T, None, x.device)  # causal only: doc_ids do not cross stages
        if self.first:
            h = self.tok_emb(x)  # (B, T, d)
            if self.pos_emb is not None:
                h = h + self.pos_emb(pos)
            x = self.emb_drop(h)
        ctx = BlockContext(
            rope=self.rope.tables(pos) if self.rope is not None else None, mask=self.backend.prepare(None, T, x.device)
        )
        for block in self.blocks.values():
            x = block(x, ctx)
        if self.last:
            x = F.linear(self.norm(x), self.head.weight)  # (B, T, V)
        return x


def check_pipeline_config(cfg: Any) -> None:
    """Refuse combinations pipeline stages cannot run (see the module docstring), with the fix."""
    if cfg.parallel.pp <= 1:
        return
    if cfg.model.tie_embeddings:
        raise UserError(
            "parallel.pp > 1 needs model.tie_embeddings=false: the embedding (first stage) and the "
            "output head (last stage) live on different ranks"
        )
    if cfg.data.format != "text":
        raise UserError(
            f"data.format={cfg.data.format} (fine-tuning) is not supported with parallel.pp > 1: each packed example "
            "must attend only to itself and pipeline stages pass hidden states only; use parallel.pp=1 (FSDP or DDP)"
        )
    if getattr(cfg.train, "document_masking", False):
        raise UserError(
            "train.document_masking is not supported with parallel.pp > 1 (only hidden states cross "
            "pipeline stages, so attention is causal); set train.document_masking=false"
        )
    if cfg.model.logit_softcap or cfg.model.z_loss:
        raise UserError(
            "model.logit_softcap and model.z_loss are not supported with parallel.pp > 1 (the last stage ends in "
            "plain logits); set both to 0"
        )


@dataclass
class PipelineParts:
    """This rank's stages and the schedule that drives them."""

    stages: list[StageModule]  # the modules (wrapped in place later by AC / compile / FSDP / DDP)
    stage_ids: list[int]
    n_stages: int
    n_microbatches: int
    schedule_name: str
    has_first: bool
    has_last: bool


def split_model(model: nn.Module, pp: int, pp_rank: int, schedule: str) -> PipelineParts:
    """Cut `model` into this pp-rank's stage modules (they share the model's parameters)."""
    spr = schedule_info(schedule)[1]
    n_stages = pp * spr
    layers = split_layers(len(model.blocks), n_stages)
    ids = stage_ids_for_rank(pp_rank, pp, schedule)
    stages = [StageModule(model, layers[s], first=s == 0, last=s == n_stages - 1) for s in ids]
    return PipelineParts(
        stages=stages,
        stage_ids=ids,
        n_stages=n_stages,
        n_microbatches=0,
        schedule_name=schedule,
        has_first=0 in ids,
        has_last=n_stages - 1 in ids,
    )


def build_schedule(
    parts: PipelineParts,
    n_micro: int,
    device: torch.device,
    pp_group: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    modules: list[nn.Module] | None = None,
) -> Any:
    """PipelineStage objects for this rank's (possibly wrapped) stage modules and the named schedule.

    `loss_fn` returns the *summed* token loss scaled by the trainer's denominator, so gradients are not
    rescaled by the microbatch count (scale_grads=False).
    """
    from torch.distributed.pipelining import PipelineStage, schedules

    cls_name, spr = schedule_info(parts.schedule_name)
    modules = modules or parts.stages
    pstages = [
        PipelineStage(m, s, parts.n_stages, device, group=pp_group)
        for m, s in zip(modules, parts.stage_ids, strict=True)
    ]
    cls = getattr(schedules, cls_name)
    parts.n_microbatches = n_micro
    if spr == 1:
        return cls(pstages[0], n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)
    return cls(pstages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=False)


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one microbatch: (b, T, V) logits in fp32, (b, T) targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
