"""Data-parallel wrappers: DDP, ZeRO-1 optimizer sharding and FSDP2 `fully_shard`.

Each function transforms a plain single-device model (or optimizer) from the outside, so model code stays
single-device; `tokenmill.parallel.engine.apply_parallelism` calls them in the one documented order.

Gradient accumulation: every strategy all-reduces (or reduce-scatters) gradients during backward; on the
accumulation micro-steps that do not end an optimizer step that traffic is wasted, so the loop wraps them
in `no_sync_context(model, sync=False)`, which knows the API of each wrapper (DDP `no_sync()`, FSDP2
`set_requires_gradient_sync`). Gradients then accumulate locally and the last micro-step syncs the sum.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from tokenmill.errors import UserError
from tokenmill.parallel.dist import DistInfo
from tokenmill.parallel.wrappers import uncompiled, unwrap

# The keys are FSDP_DTYPE_NAMES in parallel/config.py, the names config validation accepts (a test keeps them equal).
FSDP_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(uncompiled(model), FSDPModule)


# ---------------------------------------------------------------------------------------------------
# DDP


def apply_ddp(model: nn.Module, dist: DistInfo, bucket_cap_mb: int = 25) -> nn.Module:
    """Wrap in DistributedDataParallel (gradients all-reduced and averaged over ranks during backward).

    `static_graph` is off: the graph is static, but it would forbid the accumulation `no_sync()` pattern
    across differently-shaped micro-steps in some torch versions; DDP's default bucketing is used.
    """
    if not dist.distributed:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True
    )


def allreduce_grads(params: list[nn.Parameter], group: Any, world: int) -> None:
    """Average gradients over `group` in one flat buffer per dtype (DDP for pipeline stages).

    DDP's reducer does not survive the pipeline schedule's repeated forward/backward per step (its bucket
    rebuild counts every parameter once per microbatch), so data-parallel pipeline stages synchronise
    here, once, after the last accumulation micro-step. Not overlapped with backward; FSDP overlaps.
    """
    import torch.distributed as tdist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        tdist.all_reduce(flat, group=group)  # SUM: gloo has no AVG
        flat.div_(world)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)


# ---------------------------------------------------------------------------------------------------
# ZeRO-1


def apply_zero1(optimizer: torch.optim.Optimizer, dist: DistInfo, process_group: Any = None) -> torch.optim.Optimizer:
    """Re-create `optimizer` as a ZeroRedundancyOptimizer: each rank keeps the state of ~1/world of the
    parameters (greedy by size), steps them, and broadcasts the updated values (Rajbhandari et al. 2020,
    ZeRO stage 1, arXiv:1910.02054). Gradients are still all-reduced by DDP.

    The parameter groups (decay / no-decay, Muon / AdamW kinds, per-group LRs) and constructor options are
    copied from the optimizer built by `tokenmill.optim`, so the update is the same per parameter.
    `process_group`: the data-parallel ranks (with pipeline stages, only the replicas of this stage).
    """
    if not dist.distributed:
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = [{**g, "params": list(g["params"])} for g in optimizer.param_groups]
    cls = type(optimizer)
    try:
        # Each rank's local optimizer is `cls(its partition of every group, **defaults)`; `defaults` can hold
        # derived keys the constructor does not take (AdamW's decoupled_weight_decay), so keep only those it does.
        zero = ZeroRedundancyOptimizer(
            groups, optimizer_class=cls, process_group=process_group, **_constructor_kwargs(cls, optimizer.defaults)
        )
    except TypeError as err:
        raise UserError(
            f"parallel.strategy=zero1 cannot wrap the {cls.__name__} optimizer ({err}); "
            f"use parallel.strategy=ddp or fsdp with this optimizer"
        ) from err
    return zero


def _constructor_kwargs(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params and k != "params"}


def is_zero1(optimizer: torch.optim.Optimizer) -> bool:
    # Not imported unless ZeRO-1 is in use: importing torch.distributed.optim scripts (and warns about)
    # its functional optimizers.
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


def full_optimizer_state(optimizer: torch.optim.Optimizer, dist: DistInfo) -> dict[str, Any] | None:
    """The whole optimizer state in the plain `torch.optim` format (parameter index keys).

    ZeRO-1: a collective (call on every rank) that gathers every shard on rank 0; other ranks get None.
    Plain optimizers return `state_dict()` as is.
    """
    if is_zero1(optimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if dist.is_main else None
    return optimizer.state_dict()


# ---------------------------------------------------------------------------------------------------
# FSDP2


def apply_fsdp(model: nn.Module, parallel_cfg: Any, mesh: Any = None) -> nn.Module:
    """`fully_shard` each block, then the root (embedding, final norm, head) - FSDP2.

    One block = one all-gather / reduce-scatter unit, so communication for block i+1 overlaps compute of
    block i. The last block keeps its parameters gathered after forward (backward needs them at once;
    torchtitan does the same). Mixed precision: parameters are cast to `fsdp_param_dtype` for compute and
    gradients reduced in `fsdp_reduce_dtype`; the sharded master copy stays fp32. CPU offload keeps
    shards (and so the optimizer state) in host memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=FSDP_DTYPES[parallel_cfg.fsdp_param_dtype], reduce_dtype=FSDP_DTYPES[parallel_cfg.fsdp_reduce_dtype]
    )
    # On a CPU device the shards already live in host memory: offloading is a no-op (and would pin memory,
    # which needs an accelerator).
    on_accelerator = mesh is not None and mesh.device_type != "cpu"
    offload = CPUOffloadPolicy() if parallel_cfg.fsdp_cpu_offload and on_accelerator else OffloadPolicy()
    reshard = bool(parallel_cfg.fsdp_reshard_after_forward)
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    blocks = list(model.blocks.children())
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    return model


def materialize(
    model: nn.Module,
    device: torch.device,
    full_state: dict[str, torch.Tensor] | None = None,
    broadcast_from_rank0: bool = False,
) -> nn.Module:
    """Allocate a model built on `meta` (sharded or not) on `device` and initialise it.

    `init_weights()` runs first on every rank (it also fills non-persistent buffers such as the RoPE cache);
    with `broadcast_from_rank0`, rank 0's `full_state` (a plain state dict) then overwrites the parameters
    of every rank's shards, so an FSDP run starts from exactly the weights a single process would have.
    """
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=device)
        with torch.no_grad():
            unwrap(model).init_weights()
    if full_state is not None or broadcast_from_rank0:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0, strict=True)
        set_model_state_dict(model, full_state or {}, options=opts)
    return model


# ---------------------------------------------------------------------------------------------------
# Gradient sync on accumulation micro-steps


@contextlib.contextmanager
def no_sync_context(model: nn.Module, sync: bool) -> Iterator[None]:
    """Run a micro-step's forward+backward with (sync=True) or without gradient synchronisation.

    Works for every strategy: DDP (`no_sync()`), FSDP2 (`set_requires_gradient_sync`), a list of
    pipeline stage modules, and plain modules (no-op).
    """
    if sync:
        yield
        return
    mods = model if isinstance(model, (list, tuple)) else [model]
    with contextlib.ExitStack() as stack:
        for m in mods:
            inner = uncompiled(m)
            if isinstance(inner, nn.parallel.DistributedDataParallel):
                stack.enter_context(inner.no_sync())
            elif is_fsdp(inner):
                inner.set_requires_gradient_sync(False, recurse=True)
                stack.callback(inner.set_requires_gradient_sync, True, recurse=True)
        yield
