"""Sharded checkpoints (SPEC C6) through torch.distributed.checkpoint (DCP) for FSDP and pipeline runs.

Every rank writes its own shards of the model and optimizer state, in parallel, into one folder; the
folder is keyed by parameter names (`blocks.3.attn.q_proj.weight`), never by rank or layout, so a
checkpoint saved with FSDP on 2 ranks loads in a single process, with DDP, or with pp=2, and back.
The optimizer state is saved flattened per parameter (`state.<name>.exp_avg`), which is what makes it
layout-free too.

Folder layout (the same rules as tokenmill.checkpoint.manager's single-process folders):
  .metadata, __<rank>_0.distcp   DCP model + optimizer state ("model.*", "optim.*")
  state.pt, config.yaml, ...     small files written by rank 0 (`write_files` callback)
  manifest.json                  sizes and sha256 of every file, written last
Written into `.tmp-<name>` beside the final folder and renamed by rank 0 only after every rank's shards
are on disk (DCP's finish step gathers all ranks before writing `.metadata`), then the manifest - so a
crash at any point leaves the previous checkpoint as the latest valid one.

Async save (`async_save=True`): the state is copied to host memory (DCP staging) before `save_sharded`
returns, the files are written by a background thread over a separate gloo group, and the returned
handle's `wait()` finalises the folder. Call `wait()` before the next save and before exit
(`ShardedSaver` does both; torchtitan #930 is the race this avoids).

Safe loading (C4): DCP reads non-tensor values with `torch.load(weights_only=False)`; `SafeLoadPlanner`
reads them with `weights_only=True`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn

from tokenmill.errors import UserError

METADATA = ".metadata"  # written by DCP last among its files
STATE_FILE = "state.pt"


def _planner_cls() -> type:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, but non-tensor values are read with weights_only=True (no unpickled code)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes a single process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a folder written by `save_sharded` (it holds DCP's `.metadata`)."""
    return (Path(path) / METADATA).is_file()


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=True)


def get_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} with names free of wrapper prefixes (DTensor shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_options())}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd}


# ---------------------------------------------------------------------------------------------------
# Save

def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def _barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


@dataclass
class SaveHandle:
    """A save in progress (async) or done. `wait()` blocks until the folder is final and returns it."""

    final: Path
    tmp: Path
    step: int
    future: Future | None = None
    finalized: bool = False
    error: BaseException | None = field(default=None, repr=False)

    def wait(self) -> Path:
        if self.finalized:
            return self.final
        try:
            if self.future is not None:
                self.future.result()
            if _rank() == 0:
                _finalize(self.tmp, self.final, self.step)
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        finally:
            self.finalized = True
        return self.final


def _finalize(tmp: Path, final: Path, step: int) -> None:
    """Manifest last, then the atomic rename (rank 0; every shard is already on disk)."""
    from tokenmill.checkpoint.folder import fsync_path, publish_folder, write_manifest

    write_manifest(tmp, step)
    fsync_path(tmp)
    publish_folder(tmp, final)


@dataclass
class ShardWrite:
    """Shards of one checkpoint being written (async) or written into `folder` by every rank."""

    folder: Path
    future: Future | None = None

    def wait(self) -> None:
        """Block until this rank's shards (and, on rank 0, DCP's .metadata) are on disk."""
        if self.future is not None:
            future, self.future = self.future, None
            future.result()

    def move_into(self, dest: Path) -> dict[str, dict[str, Any]]:
        """Rank 0: move every written file into checkpoint folder `dest` (same filesystem: renames)."""
        self.wait()
        moved = {}
        for path in sorted(self.folder.iterdir()):
            os.replace(path, dest / path.name)
            moved[path.name] = path.name
        shutil.rmtree(self.folder, ignore_errors=True)
        return moved


def write_shards(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 async_save: bool = False, process_group: tdist.ProcessGroup | None = None) -> ShardWrite:
    """Every rank writes its model + optimizer shards into `folder` (a collective; emptied first by rank 0).

    With `async_save` the state is staged to host memory before this returns and written by a background
    thread; `wait()` (or `move_into`) blocks until it is on disk. `process_group` should then be a gloo
    group kept for checkpoints, so background writes never share a communicator with training.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if _rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)  # left by a save that was killed
        folder.mkdir(parents=True)
    _barrier()  # the folder exists before any rank writes into it
    state = get_sharded_state(model, optimizer)
    try:
        if async_save:
            return ShardWrite(folder, dcp.async_save(state, checkpoint_id=str(folder), process_group=process_group))
        with _quiet():
            dcp.save(state, checkpoint_id=str(folder), no_dist=not tdist.is_initialized())
    except OSError as err:
        raise UserError(f"could not write sharded checkpoint {folder}: {err.strerror or err} (earlier checkpoints "
                        f"are intact; check free space and permissions)") from err
    return ShardWrite(folder)


def save_sharded(final: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int = 0,
                 write_files: Callable[[Path], None] | None = None, extra_state: dict[str, Any] | None = None,
                 async_save: bool = False, process_group: tdist.ProcessGroup | None = None) -> SaveHandle:
    """Write model + optimizer shards of every rank into checkpoint folder `final` (a collective).

    Rank 0 also writes `extra_state` (tensors and primitives only) as state.pt and calls
    `write_files(tmp_folder)` for any other small files - both at call time, so they describe the same
    step as the shards - and the manifest last. With `async_save` the returned handle must be waited on
    (see `write_shards` for `process_group`).
    """
    from tokenmill.checkpoint.folder import TMP_PREFIX, write_file

    final = Path(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}"
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        shards = write_shards(tmp, model, optimizer, async_save=async_save, process_group=process_group)
        if _rank() == 0:
            if extra_state is not None:
                write_file(tmp / STATE_FILE, lambda f: torch.save(extra_state, f))
            if write_files is not None:
                write_files(tmp)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    handle = SaveHandle(final=final, tmp=tmp, step=step, future=shards.future)
    if async_save:
        return handle
    handle.wait()
    _barrier()  # nobody reads or prunes checkpoints before the rename
    return handle


class ShardedSaver:
    """Keeps at most one async save in flight: a new save (and `close`) waits for the previous one."""

    def __init__(self, async_save: bool = False) -> None:
        self.async_save = async_save
        self.pending: SaveHandle | None = None
        self._group: tdist.ProcessGroup | None = None

    def save(self, final: str | Path, model: nn.Module, optimizer: Any, step: int = 0,
             write_files: Callable[[Path], None] | None = None, extra_state: dict[str, Any] | None = None) -> SaveHandle:
        self.wait()
        if self.async_save and tdist.is_initialized() and self._group is None:
            self._group = tdist.new_group(backend="gloo")  # collective: every rank saves at the same step
        self.pending = save_sharded(final, model, optimizer, step, write_files, extra_state,
                                    async_save=self.async_save, process_group=self._group)
        return self.pending

    def wait(self) -> Path | None:
        """Block until the in-flight save is final (every rank), returning its folder."""
        if self.pending is None:
            return None
        try:
            path = self.pending.wait()
        finally:
            self.pending = None
        _barrier()
        return path

    def close(self) -> None:
        self.wait()


# ---------------------------------------------------------------------------------------------------
# Load

def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 strict: bool = True) -> dict[str, Any]:
    """Load model (+ optimizer) state from a sharded folder into this rank's layout, in place.

    Works in any layout (single process, DDP, FSDP on any world size, pipeline stages): each rank reads
    the slices it holds. Returns rank 0's state.pt (`extra_state`) or {} when there is none.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UserError(f"{path} is not a sharded checkpoint ({METADATA} is missing); pass a folder written by a "
                        f"distributed (fsdp or pipeline) run")
    if type(optimizer).__name__ == "ZeroRedundancyOptimizer":
        raise UserError(f"{path} is a sharded checkpoint, which parallel.strategy=zero1 cannot resume; resume it "
                        f"with parallel.strategy=fsdp, ddp or single")
    state = get_sharded_state(model, optimizer)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path), planner=_planner_cls()(allow_partial_load=not strict),
                     no_dist=not tdist.is_initialized())
    except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"sharded checkpoint {path} does not fit this model/optimizer ({_cause(err)}); resume "
                        f"with the same model.* and optim.* settings") from err
    opts = StateDictOptions(flatten_optimizer_state_dict=True, strict=strict)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)
    extra = path / STATE_FILE
    return torch.load(extra, map_location="cpu", weights_only=True) if extra.is_file() else {}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict[str, torch.Tensor],
                    optim_sd: dict[str, Any] | None = None) -> None:
    """Load a single-process checkpoint's full state into a sharded layout (FSDP shards, pipeline stages).

    Every rank passes the full state and keeps its own slices. The optimizer state is in torch's native
    format (parameters by index); indices are mapped to names through the groups' `names` (tokenmill's
    optimizers record them) or, without names, through the parameter order, which must then match.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    local = set(get_sharded_state(model, None)["model"])
    missing = sorted(local - set(model_sd))
    if missing:
        raise UserError(f"checkpoint weights lack {', '.join(missing[:4])}: the model config changed since it was saved")
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, {k: v for k, v in model_sd.items() if k in local}, options=opts)
    if optimizer is None or optim_sd is None:
        return
    current = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    names_now = [name for g in current["param_groups"] for name in g["params"]]
    saved_ids = [i for g in optim_sd["param_groups"] for i in g["params"]]
    if all("names" in g for g in optim_sd["param_groups"]):
        saved_names = [n for g in optim_sd["param_groups"] for n in g["names"]]
    elif len(saved_ids) == len(names_now):
        saved_names = names_now
    else:
        raise UserError("the checkpoint's optimizer state does not match this model's parameters; resume with the "
                        "same model.* and optim.* settings")
    by_id = dict(zip(saved_ids, saved_names))
    keep = set(names_now)
    state = {by_id[i]: v for i, v in optim_sd["state"].items() if by_id.get(i) in keep}
    groups = []
    for g in optim_sd["param_groups"]:
        params = [by_id[i] for i in g["params"] if by_id[i] in keep]
        if params:
            groups.append({**{k: v for k, v in g.items() if k != "names"}, "params": params})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=opts)


def _cause(err: BaseException) -> str:
    """The innermost error line of a DCP exception (it wraps each rank's traceback in one message)."""
    lines = [ln.strip() for ln in str(err).splitlines() if "Error:" in ln or "Exception:" in ln]
    return (lines[-1] if lines else str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)[:300]


# ---------------------------------------------------------------------------------------------------
# Consolidate

def consolidate(path: str | Path, out: str | Path) -> Path:
    """Merge the model shards of a sharded checkpoint into one safetensors file (no process group needed).

    Reads only the "model.*" entries (not the optimizer), so it needs host memory for the weights once.
    The result loads with `safetensors.torch.load_file` under the plain model's names.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise UserError(f"{path} is not a sharded checkpoint ({METADATA} is missing); `tokenmill checkpoint "
                        f"consolidate` needs a folder written by a distributed (fsdp or pipeline) run")
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    tensors: dict[str, torch.Tensor] = {}
    for key, item in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            tensors[key[len("model."):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not tensors:
        raise UserError(f"sharded checkpoint {path} holds no model weights")
    with _quiet():
        dcp.load({"model": tensors}, storage_reader=reader, planner=_planner_cls()(allow_partial_load=True),
                 no_dist=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out
