"""Process-group lifecycle and rank-aware helpers: one place that knows whether this is a distributed run.

`init_distributed` reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and creates the default process group: NCCL when the device is CUDA, gloo on CPU. Launched without
torchrun (no WORLD_SIZE), it returns a single-process DistInfo and creates no group, so every helper
here (`barrier`, `all_reduce`, ...) degrades to a no-op and the same training code runs everywhere.

Failure behaviour: the collective timeout is `parallel.timeout_s`; a rank that raises calls
`destroy_distributed()` on its way out and exits non-zero, and torchrun's agent then tears down the
other ranks (they would otherwise wait at the next collective until the timeout).
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.errors import UserError


@dataclass
class DistInfo:
    """Where this process sits in the job. `device` is the device this rank computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        """True on the rank that logs, writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.run) always export WORLD_SIZE and RANK to each worker."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_device(device: str, local_rank: int) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA exists, else cpu; 'cuda' -> cuda:LOCAL_RANK; else as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={device!r} but CUDA is not available; use train.device=cpu or auto")
    if device == "cuda":
        return torch.device("cuda", local_rank)
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"train.device={device!r} is not a device: choose auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"train.device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use train.device=cuda (one per local rank) or a smaller index"
        )
    return resolved


def init_distributed(parallel_cfg: Any, device: str = "auto") -> DistInfo:
    """Join the torchrun job (or not), pick the backend from the device, and return this rank's DistInfo.

    `parallel_cfg` needs `timeout_s`. Idempotent: when a default group already exists (tests, notebooks)
    it is reused.
    """
    if not launched_by_torchrun():
        return DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device, 0), backend=None)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # NCCL only moves CUDA tensors; gloo runs everywhere (CPU tests, laptops).
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if rank == 0 and stale_store_risk():
        warnings.warn(
            "torchrun --max-restarts with its shared rendezvous store can hand restarted workers the "
            "addresses of the dead ones (pytorch/pytorch#135712); export "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (deploy/ scripts do)",
            stacklevel=2,
        )
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=int(getattr(parallel_cfg, "timeout_s", 600)))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if dev.type == "cuda":
            # Binding the device eagerly lets NCCL create communicators without guessing the GPU.
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    else:
        backend = dist.get_backend()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def torchrun_restarts_workers() -> bool:
    """True under a torchrun that relaunches the workers when one exits non-zero (--max-restarts > 0)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0


def stale_store_risk() -> bool:
    """True when torchrun may restart workers (--max-restarts > 0) while sharing its TCPStore with them."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and torchrun_restarts_workers()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def print0(*args: Any, **kw: Any) -> None:
    """print() on rank 0 only, so a message appears once per run rather than once per process."""
    if get_rank() == 0:
        print(*args, **kw)


def barrier() -> None:
    """Wait for every rank; no-op in a single process."""
    if is_distributed():
        dist.barrier()


def all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp.RedOpType | str = "sum", group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """In-place all-reduce (op: 'sum', 'max', 'min', 'avg' or a ReduceOp); returns the tensor. No-op alone.

    'avg' is done as sum / world size because gloo has no AVG op.
    """
    if not is_distributed():
        return tensor
    if isinstance(op, str):
        if op == "avg":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            tensor.div_(dist.get_world_size(group))
            return tensor
        op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank (e.g. a run folder name chosen on rank 0)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_over_ranks(value: int, device: torch.device | None = None) -> int:
    """The largest `value` over all ranks: one all-reduce that gives every rank the same decision (job-control
    codes are ordered so that the strongest request wins)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device or _collective_device())
    all_reduce(t, "max")
    return int(t.item())  # host sync: intended, the decision is needed on the host


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when `flag` is true on any rank: for decisions every rank must take together (skip a step, data
    exhausted), so no rank waits alone at the next collective."""
    return bool(max_over_ranks(int(flag), device))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed(failed: bool | None = None) -> None:
    """Tear down the process group (safe to call twice or when none exists); call it from a `finally`.

    `failed` defaults to "an exception is propagating" (sys.exc_info() inside the finally).
    On success every rank first meets at a barrier (no rank closes its connections while a peer still
    talks) and garbage is collected, so wrapper state that holds process-group work (FSDP, DTensor) is
    freed while the interpreter is alive (gloo can abort at interpreter exit otherwise; pytorch #179291).
    On failure no collective is attempted: gloo groups are destroyed locally, NCCL groups are left to the
    exiting process (a collective destroy can hang while peers block in a collective; torchtitan #1342),
    and torchrun stops the other ranks once this one exits non-zero.
    """
    if not is_distributed():
        return
    if failed is None:
        failed = sys.exc_info()[0] is not None
    if failed and dist.get_backend() == "nccl":
        return
    gc.collect()
    if not failed:
        dist.barrier()
    dist.destroy_process_group()
