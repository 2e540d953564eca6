"""Maths over the whole job, not one rank: token counts, the gradient norm, and step metrics.

Pitfalls this module exists for:
- Loss normalisation: averaging per micro-batch or per rank gives (x1/n1 + x2/n2)/2, not
  (x1 + x2)/(n1 + n2) (torchtune PR #1875), and with masked targets (prompts, padding) the counts differ per
  micro-batch and rank. `Engine.loss_denominator` counts the valid targets of a whole optimizer step and
  divides every micro-step's summed token loss by `loss_denominator(...)` of that count, so the gradients
  DDP/FSDP average equal the gradient of the mean over every valid token of every rank and micro-step.
- Gradient norm: with FSDP2 each rank holds gradient shards (DTensors) and with pipeline parallelism
  each rank holds one stage's gradients, so a local `clip_grad_norm_` sees part of the model
  (torchtitan #596). `clip_grad_norm_` here reduces over shards (DTensor `full_tensor`) and over the
  pipeline group, then clips every rank by the same global norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as tdist

from tokenmill.parallel.dist import DistInfo, all_reduce, is_distributed

# How each step metric combines over ranks; anything not listed is averaged.
METRIC_REDUCTIONS: dict[str, str] = {
    "tokens_per_s": "sum",
    "tokens": "sum",
    "tflops": "sum",
    "step_time_s": "max",
    "mem_allocated_gib": "max",
    "mem_peak_gib": "max",
    "mem_reserved_gib": "max",
}


def global_token_count(
    local_tokens: int | torch.Tensor, dist: DistInfo, group: tdist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum of a per-rank token count over the data-parallel ranks (a float64 tensor on this rank's device).

    With padding / ignore_index the counts differ per rank, so they must be summed, not assumed.
    Host sync only if the caller reads the value.
    """
    t = torch.as_tensor(local_tokens, dtype=torch.float64, device=dist.device).clone().reshape(())
    return all_reduce(t, "sum", group=group)


def loss_denominator(
    local_tokens: int | torch.Tensor,
    dist: DistInfo,
    dp_size: int | None = None,
    group: tdist.ProcessGroup | None = None,
) -> torch.Tensor:
    """What each rank divides its summed token loss by: global tokens / data-parallel size.

    DDP and FSDP average gradients over the `dp_size` ranks, so dividing by (global / dp_size) makes the
    averaged gradient sum(token losses of all ranks) / global tokens - the per-token mean over the job.
    The logged loss is then all_reduce(avg) of each rank's value.
    """
    dp = dp_size if dp_size is not None else dist.world_size
    return global_token_count(local_tokens, dist, group=group) / dp


def clip_grad_norm_(
    parameters: torch.nn.Module | Iterable[torch.nn.Parameter],
    max_norm: float,
    norm_type: float = 2.0,
    pp_group: tdist.ProcessGroup | None = None,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Clip gradients by the norm over the *whole* model; returns the pre-clip total norm (a tensor).

    1. local norm of this rank's gradients (DTensor gradients give a DTensor norm with a pending
       reduction over the FSDP mesh; `full_tensor()` completes it);
    2. with pipeline stages, combine the per-stage norms over `pp_group`: sum of p-th powers
       (max for the inf-norm);
    3. scale every gradient by min(1, max_norm / total) (`max_norm <= 0` only measures).
    Same recipe as torchtitan's `dist_utils.clip_grad_norm_`. No host sync.
    """
    params = list(parameters.parameters()) if isinstance(parameters, torch.nn.Module) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False, foreach=foreach)
    else:  # a stage or rank without gradients contributes 0
        total = torch.zeros((), device=params[0].device if params else "cpu")
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if pp_group is not None and is_distributed():
        if math.isinf(norm_type):
            tdist.all_reduce(total, op=tdist.ReduceOp.MAX, group=pp_group)
        else:
            total = total.pow(norm_type)
            tdist.all_reduce(total, op=tdist.ReduceOp.SUM, group=pp_group)
            total = total.pow(1.0 / norm_type)
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


def reduce_metrics(
    metrics: Mapping[str, float], dist: DistInfo, reductions: Mapping[str, str] = METRIC_REDUCTIONS
) -> dict[str, float]:
    """Combine per-rank scalar metrics: throughputs summed, times and memory maxed, the rest averaged.

    One all-reduce per reduction kind (a collective: every rank must call it with the same keys).
    """
    if not dist.distributed or not metrics:
        return dict(metrics)
    out: dict[str, float] = {}
    by_op: dict[str, list[str]] = {}
    for key in sorted(metrics):
        by_op.setdefault(reductions.get(key, "avg"), []).append(key)
    for op, keys in by_op.items():
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=dist.device)
        all_reduce(t, op)
        out.update(zip(keys, t.tolist(), strict=True))  # host sync: metrics are logged from the host
    return out
